"""The original OpenGVLab NaViL checkpoint (SPEC §7): reading the folder, mapping its config to ours and
back, and the tensor names and shapes its config implies.

Config mapping, both ways. The keys of the original config.json fall into three groups:

* mapped -- the keys our `NaViLConfig` represents (`TOP_LEVEL_MAPPED`, `VISION_MAPPED`, `LLM_MAPPED` and
  the per-architecture `LLM_MAPPED_BY_ARCH`): `convert_config` reads them into our fields and
  `to_original_config` writes them back from our fields, so an edit of our config reaches the original;
* boilerplate -- transformers' generic `PretrainedConfig` attributes at their generic defaults
  (`GENERIC_DEFAULTS`) and save-time records (`_`-prefixed keys, `transformers_version`): no model
  reads them, so they are neither kept nor written back;
* everything else (`force_image_size`, `ps_version`, `use_flash_attn`, `skip_final_norm_weight`, ...):
  we cannot know which ones the original code reads, so `convert_config` keeps all of them verbatim in
  our config's `original_config_extras` (nested like the original: top-level keys, `vision_config`,
  `llm_config`) and `to_original_config` writes them back unchanged.

So original -> ours -> original gives back every non-boilerplate key (`significant_config`) with its value,
and ours -> original -> ours gives our config unchanged.
"""

import copy
import json
from pathlib import Path

from configuration_navil import (
    SPECIAL_TOKENS,
    NaViLConfig,
    rope_parameters_from_legacy,
    token_id_fields,
)

from ..errors import ConversionError
from ..folders import CONFIG_FILE, SAFETENSORS_INDEX, read_safetensors, safetensors_files, shard_index
from .keymap import INTERNLM2, LLM_KEYS, QWEN3, KeyMismatchError, match_source, rules_for
from .schema import validate_original_config

ORIGINAL_MODEL_TYPE = "navil_chat"
ORIGINAL_ARCHITECTURES = ["NaViL"]
ORIGINAL_VISION_MODEL_TYPE = "navil_vit"
LLM_MODEL_TYPES = {QWEN3: "qwen3", INTERNLM2: "internlm2"}
SUPPORTED_LLM_ARCHITECTURES = tuple(LLM_KEYS)

VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "patch_size", "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "hidden_act",
    "fullatt_block_indexes", "window_size", "initializer_range", "initializer_factor",
)  # fmt: skip
REQUIRED_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOP_LEVEL_FIELDS = ("downsample_ratio", "template", "min_dynamic_patch", "max_dynamic_patch", "scale_downsample_ratio")
LLM_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Keys our config represents (see the module docstring); the rest is carried in `original_config_extras`.
# `special_token_table` is ours (SPEC §10); an original config.json carries it only when a model trained with this
# package applies the table everywhere (the original code ignores it and applies the table to the prompt only).
TOP_LEVEL_MAPPED = (
    "model_type", "architectures", "torch_dtype", "vision_config", "llm_config", "special_token_table",
    *TOP_LEVEL_FIELDS,
)  # fmt: skip
VISION_MAPPED = ("model_type", *VISION_FIELDS)
LLM_MAPPED = (
    "architectures", "model_type", *REQUIRED_LLM_FIELDS, "num_key_value_heads", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
    "initializer_range", *LLM_TOKEN_FIELDS,
)  # fmt: skip
LLM_MAPPED_BY_ARCH = {QWEN3: ("head_dim", "attention_bias"), INTERNLM2: ("bias",)}  # InternLM2 derives head_dim
EXTRAS_KEY = "original_config_extras"

# transformers' generic PretrainedConfig attributes with their defaults, as transformers 4.x (which saved the
# original checkpoints) writes them into every config and sub-config. No model reads them; a key listed here
# that holds this value is boilerplate. Generic keys that LLM configs give defaults of their own (the token
# ids, `tie_word_embeddings`) are deliberately not listed: they are always kept.
GENERIC_DEFAULTS = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": None, "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "architectures": None, "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None, "prefix": None, "sep_token_id": None, "decoder_start_token_id": None,
    "task_specific_params": None, "problem_type": None,
}  # fmt: skip
SAVE_TIME_KEYS = ("transformers_version",)  # plus every `_`-prefixed key (_name_or_path, _commit_hash, ...)


class OriginalCheckpointError(ConversionError):
    """The folder is not a readable original NaViL checkpoint."""


# ---------------------------------------------------------------------------------------------------
# Reading the folder


def load_original_config(original_dir):
    original_dir = Path(original_dir)
    if not original_dir.is_dir():
        raise OriginalCheckpointError(f"{original_dir} is not a directory")
    path = original_dir / CONFIG_FILE
    if not path.is_file():
        raise OriginalCheckpointError(f"{original_dir} has no config.json: not an original NaViL checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OriginalCheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise OriginalCheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != ORIGINAL_MODEL_TYPE:
        hint = " (this folder is already in our format)" if model_type == NaViLConfig.model_type else ""
        raise OriginalCheckpointError(
            f"{path} has model_type {model_type!r}, expected {ORIGINAL_MODEL_TYPE!r} "
            f"(an original OpenGVLab NaViL checkpoint){hint}"
        )
    validate_original_config(config, path)
    return config


def weight_files(original_dir):
    """The safetensors files of the checkpoint (from the shard index if there is one)."""
    original_dir = Path(original_dir)
    if (original_dir / SAFETENSORS_INDEX).is_file():
        files = sorted(set(shard_index(original_dir, OriginalCheckpointError).values()))
        missing = [f for f in files if not (original_dir / f).is_file()]
        if missing:
            raise OriginalCheckpointError(
                f"{original_dir / SAFETENSORS_INDEX} lists shards that are not in the folder: {', '.join(missing)}"
            )
        return [original_dir / f for f in files]
    return safetensors_files(original_dir, OriginalCheckpointError)


def load_original_state_dict(original_dir, progress=None):
    """All tensors of the checkpoint, by original key. `progress(n)` is called per tensor read."""
    original_dir = Path(original_dir)
    state_dict = {}
    for path in weight_files(original_dir):
        for key, tensor in read_safetensors(path, OriginalCheckpointError):
            if key in state_dict:
                raise OriginalCheckpointError(f"tensor {key} appears in more than one shard (again in {path.name})")
            state_dict[key] = tensor
            if progress is not None:
                progress()
    if (original_dir / SAFETENSORS_INDEX).is_file():
        listed = set(shard_index(original_dir, OriginalCheckpointError))
        if listed != set(state_dict):
            raise OriginalCheckpointError(
                f"{original_dir / SAFETENSORS_INDEX} does not match the shards: listed but absent: "
                f"{sorted(listed - set(state_dict))[:10]}, present but unlisted: {sorted(set(state_dict) - listed)[:10]}"
            )
    return state_dict


# ---------------------------------------------------------------------------------------------------
# Config


def llm_architecture(original_config):
    architectures = original_config["llm_config"].get("architectures") or [None]
    arch = architectures[0]
    if arch not in SUPPORTED_LLM_ARCHITECTURES:
        raise OriginalCheckpointError(
            f"unsupported llm_config.architectures {arch!r}; supported: {', '.join(SUPPORTED_LLM_ARCHITECTURES)}"
        )
    return arch


def _require(section, fields, where):
    missing = [f for f in fields if section.get(f) is None]
    if missing:
        raise OriginalCheckpointError(f"config.json {where} lacks {', '.join(missing)}")


def special_token_ids(tokenizer):
    """{token: id} for the special and image tokens NaViL needs; an error names any the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    tokens = (*SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>")
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise OriginalCheckpointError(f"the tokenizer has no {', '.join(missing)} token(s); NaViL needs them")
    return {t: vocab[t] for t in tokens}


def is_boilerplate(key, value):
    """A generic `PretrainedConfig` attribute at its generic default, or a save-time record."""
    if key.startswith("_") or key in SAVE_TIME_KEYS:
        return True
    return key in GENERIC_DEFAULTS and _json(value) == _json(GENERIC_DEFAULTS[key])


def _json(value):
    return json.loads(json.dumps(value))  # int dict keys -> str, tuples -> lists, as in config.json


def significant_config(original_config):
    """The original config without boilerplate keys (at the top and in both sub-configs): what the
    round trip original -> ours -> original gives back."""

    def strip(section):
        return {k: v for k, v in section.items() if not is_boilerplate(k, v)}

    out = strip(original_config)
    for name in ("vision_config", "llm_config"):
        if isinstance(out.get(name), dict):
            out[name] = strip(out[name])
    return out


def config_extras(original_config):
    """The keys of an original config that our config does not represent and that are not boilerplate,
    verbatim, nested like the original (stored as our config's `original_config_extras`)."""
    arch = llm_architecture(original_config)
    significant = significant_config(original_config)
    extras = {k: copy.deepcopy(v) for k, v in significant.items() if k not in TOP_LEVEL_MAPPED}
    for name, mapped in (("vision_config", VISION_MAPPED), ("llm_config", LLM_MAPPED + LLM_MAPPED_BY_ARCH[arch])):
        section = {k: copy.deepcopy(v) for k, v in significant[name].items() if k not in mapped}
        if section:
            extras[name] = section
    return extras


def convert_config(original_config, token_ids, fold_visual_output=False):
    """Our `NaViLConfig` for an original config dict. `token_ids` maps token strings to ids
    (`special_token_ids(tokenizer)`). InternLM2's visual output chain is kept (`chain_visual_output`)
    unless `fold_visual_output`. Keys our config does not represent go to `original_config_extras`."""
    arch = llm_architecture(original_config)
    vc, llm = original_config["vision_config"], original_config["llm_config"]
    _require(vc, REQUIRED_VISION_FIELDS, "vision_config")
    _require(llm, REQUIRED_LLM_FIELDS, "llm_config")
    downsample_ratio = original_config.get("downsample_ratio", vc.get("downsample_ratio", 0.5))

    vision_config = {k: vc[k] for k in VISION_FIELDS if k in vc}
    vision_config["spatial_merge_size"] = round(1 / downsample_ratio)

    heads = llm["num_attention_heads"]
    bias = bool(llm.get("attention_bias", False) if arch == QWEN3 else llm.get("bias", False))
    text_config = {
        **{k: llm[k] for k in REQUIRED_LLM_FIELDS},
        "num_key_value_heads": llm.get("num_key_value_heads") or heads,
        "head_dim": llm.get("head_dim") or llm["hidden_size"] // heads,
        "hidden_act": llm.get("hidden_act", "silu"),
        "max_position_embeddings": llm.get("max_position_embeddings", 32768),
        "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
        "rope_parameters": rope_parameters_from_legacy(llm.get("rope_theta"), llm.get("rope_scaling")),
        "qk_norm": arch == QWEN3,
        "attention_bias": bias,
        "attention_out_bias": bias,
        "chain_visual_output": arch == INTERNLM2 and not fold_visual_output,
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        **{k: llm.get(k) for k in LLM_TOKEN_FIELDS},
    }
    if "initializer_range" in llm:
        text_config["initializer_range"] = llm["initializer_range"]

    top = {k: original_config[k] for k in TOP_LEVEL_FIELDS if k in original_config}
    top["downsample_ratio"] = downsample_ratio
    # What the original computes (SPEC §8.3: the table on prompt tokens only) unless the folder says otherwise.
    top["special_token_table"] = original_config.get("special_token_table", "prompt")
    extras = config_extras(original_config)
    try:
        return _navil_config(vision_config, text_config, token_ids, top, extras or None)
    except ValueError as e:
        raise OriginalCheckpointError(f"config.json cannot be mapped: {e}") from None


def _navil_config(vision_config, text_config, token_ids, top, extras):
    return NaViLConfig(
        original_config_extras=extras,
        vision_config=vision_config,
        text_config=text_config,
        **token_id_fields(token_ids),
        architectures=["NaViLForConditionalGeneration"],
        **top,
    )


def original_llm_architecture(config):
    """The original language model class our config corresponds to: Qwen3 has per-head q/k norms,
    InternLM2 has none (SPEC §6)."""
    return QWEN3 if config.text_config.qk_norm else INTERNLM2


def check_representable(config):
    """Raise `ConversionError` naming the first setting of our config the original NaViL code cannot express."""
    text, vision = config.text_config, config.vision_config
    arch = original_llm_architecture(config)
    problems = []
    if float(vision.rope_theta) != 10000.0:
        problems.append(f"vision_config.rope_theta is {vision.rope_theta} (the original fixes 10000)")
    if text.attention_bias != text.attention_out_bias:
        problems.append(
            f"text_config.attention_bias ({text.attention_bias}) differs from attention_out_bias "
            f"({text.attention_out_bias}) (the original has one bias flag for q/k/v/o)"
        )
    if text.mlp_bias:
        problems.append("text_config.mlp_bias is true (the original FFNs have no bias)")
    if getattr(vision, "token_order", "window") != "window":
        problems.append(
            f"vision_config.token_order is {vision.token_order!r} (the original hands visual tokens to the LLM "
            "in window order, SPEC §8.1)"
        )
    if not getattr(text, "visual_experts", True):
        problems.append("text_config.visual_experts is false (every original decoder layer has visual experts)")
    if arch == QWEN3 and getattr(text, "chain_visual_output", False):
        problems.append("text_config.chain_visual_output is true with qk_norm (only InternLM2 chains o_proj_ve)")
    if arch == INTERNLM2 and text.head_dim * text.num_attention_heads != text.hidden_size:
        problems.append(
            f"text_config.head_dim {text.head_dim} x {text.num_attention_heads} heads != hidden_size "
            f"{text.hidden_size} (InternLM2 derives head_dim from them)"
        )
    if problems:
        raise ConversionError(f"this config cannot be written in the original NaViL layout: {'; '.join(problems)}")
    return arch


def _rope_scaling(rope_parameters, arch):
    params = dict(rope_parameters or {})
    theta = float(params.pop("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default" and not params:
        return theta, None
    # the key each original LLM reads: InternLM2's code `rope_scaling["type"]`, Qwen3's `rope_type`
    return theta, {("type" if arch == INTERNLM2 else "rope_type"): rope_type, **params}


def to_original_config(config, torch_dtype=None):
    """The original config.json (a dict) for our `NaViLConfig`: the inverse of `convert_config`. Mapped keys
    come from our fields, the rest from `original_config_extras` verbatim; `torch_dtype` (a torch dtype or
    its name) is the dtype of the weights written beside it. Raises `ConversionError` when our config has
    a setting the original cannot express."""
    arch = check_representable(config)
    text, vision = config.text_config, config.vision_config
    extras = copy.deepcopy(getattr(config, EXTRAS_KEY, None) or {})

    vision_config = {
        **extras.pop("vision_config", {}),
        "model_type": ORIGINAL_VISION_MODEL_TYPE,
        **{k: copy.deepcopy(getattr(vision, k)) for k in VISION_FIELDS},
    }
    rope_theta, rope_scaling = _rope_scaling(text.rope_parameters, arch)
    llm_config = {
        **extras.pop("llm_config", {}),
        "architectures": [arch],
        "model_type": LLM_MODEL_TYPES[arch],
        **{k: getattr(text, k) for k in REQUIRED_LLM_FIELDS},
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": bool(text.tie_word_embeddings),
        "initializer_range": text.initializer_range,
        **{k: getattr(text, k) for k in LLM_TOKEN_FIELDS},
    }
    if arch == QWEN3:
        llm_config.update(head_dim=text.head_dim, attention_bias=bool(text.attention_bias))
    else:
        llm_config["bias"] = bool(text.attention_bias)

    original = {
        **extras,
        "model_type": ORIGINAL_MODEL_TYPE,
        "architectures": list(ORIGINAL_ARCHITECTURES),
        **{k: copy.deepcopy(getattr(config, k)) for k in TOP_LEVEL_FIELDS},
        "vision_config": vision_config,
        "llm_config": llm_config,
    }
    if config.special_token_table != "prompt":  # round-trips; the original code itself ignores it
        original["special_token_table"] = config.special_token_table
    if torch_dtype is not None:
        original["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    return original


# ---------------------------------------------------------------------------------------------------
# Tensor names and shapes an original config implies


def expected_original_shapes(original_config):
    """{original key: shape} for every tensor an original checkpoint with this config holds."""
    arch = llm_architecture(original_config)
    vc, llm = original_config["vision_config"], original_config["llm_config"]
    shapes = {}

    C, I, p = vc["hidden_size"], vc["intermediate_size"], vc.get("patch_size", 16)
    shapes["vision_model.embeddings.patch_embedding.weight"] = (C, vc.get("num_channels", 3), p, p)
    shapes["vision_model.embeddings.patch_embedding.bias"] = (C,)
    norm_params = ("weight", "bias") if vc.get("norm_type", "rms_norm") == "layer_norm" else ("weight",)
    for n in range(vc["num_hidden_layers"]):
        v = f"vision_model.encoder.layers.{n}"
        for norm in ("norm1", "norm2"):
            shapes.update({f"{v}.{norm}.{w}": (C,) for w in norm_params})
        shapes[f"{v}.attn.qkv.weight"] = (3 * C, C)
        if vc.get("qkv_bias", True):
            shapes[f"{v}.attn.qkv.bias"] = (3 * C,)
        if vc.get("qk_normalization", False):
            shapes[f"{v}.attn.q_norm.weight"] = shapes[f"{v}.attn.k_norm.weight"] = (C,)
        shapes.update({f"{v}.attn.proj.weight": (C, C), f"{v}.attn.proj.bias": (C,)})
        shapes.update({f"{v}.mlp.fc1.weight": (I, C), f"{v}.mlp.fc1.bias": (I,)})
        shapes.update({f"{v}.mlp.fc2.weight": (C, I), f"{v}.mlp.fc2.bias": (C,)})
        shapes.update({f"{v}.ls1": (C,), f"{v}.ls2": (C,)})

    D, V, FF = llm["hidden_size"], llm["vocab_size"], llm["intermediate_size"]
    merged = C * round(1 / original_config.get("downsample_ratio", 0.5)) ** 2
    shapes.update({"mlp1.0.weight": (merged,), "mlp1.0.bias": (merged,)})
    shapes.update({"mlp1.1.weight": (D, merged), "mlp1.1.bias": (D,)})
    shapes.update({"mlp1.3.weight": (D, D), "mlp1.3.bias": (D,)})
    shapes["special_token_embedding.weight"] = (len(SPECIAL_TOKENS), D)

    H = llm["num_attention_heads"]
    KV = llm.get("num_key_value_heads") or H
    hd = llm.get("head_dim") or D // H
    L = "language_model.model.layers"
    for n in range(llm["num_hidden_layers"]):
        if arch == QWEN3:
            shapes[f"{L}.{n}.input_layernorm.weight"] = shapes[f"{L}.{n}.post_attention_layernorm.weight"] = (D,)
            for ve in ("", "_ve"):
                a = f"{L}.{n}.self_attn"
                rows = {"q": H * hd, "k": KV * hd, "v": KV * hd, "o": D}
                for proj, out in rows.items():
                    shapes[f"{a}.{proj}_proj{ve}.weight"] = (out, H * hd if proj == "o" else D)
                    if llm.get("attention_bias", False):
                        shapes[f"{a}.{proj}_proj{ve}.bias"] = (out,)
                shapes[f"{a}.q_norm{ve}.weight"] = shapes[f"{a}.k_norm{ve}.weight"] = (hd,)
                m = f"{L}.{n}.mlp{ve}"
                shapes.update({f"{m}.gate_proj.weight": (FF, D), f"{m}.up_proj.weight": (FF, D)})
                shapes[f"{m}.down_proj.weight"] = (D, FF)
        else:
            shapes[f"{L}.{n}.attention_norm.weight"] = shapes[f"{L}.{n}.ffn_norm.weight"] = (D,)
            for ve in ("", "_ve"):
                a = f"{L}.{n}.attention"
                shapes[f"{a}.wqkv{ve}.weight"] = ((H + 2 * KV) * hd, D)
                shapes[f"{a}.wo{ve}.weight"] = (D, H * hd)
                if llm.get("bias", False):
                    shapes[f"{a}.wqkv{ve}.bias"] = ((H + 2 * KV) * hd,)
                    shapes[f"{a}.wo{ve}.bias"] = (D,)
                f = f"{L}.{n}.feed_forward{ve}"
                shapes.update({f"{f}.w1.weight": (FF, D), f"{f}.w3.weight": (FF, D), f"{f}.w2.weight": (D, FF)})
    embed, head = (
        ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
        if arch == QWEN3
        else ("language_model.model.tok_embeddings.weight", "language_model.output.weight")
    )
    shapes.update({embed: (V, D), "language_model.model.norm.weight": (D,), head: (V, D)})
    return shapes


def lm_head_key(original_config):
    return (
        "language_model.lm_head.weight"
        if llm_architecture(original_config) == QWEN3
        else "language_model.output.weight"
    )


def embedding_key(original_config):
    return (
        "language_model.model.embed_tokens.weight"
        if llm_architecture(original_config) == QWEN3
        else "language_model.model.tok_embeddings.weight"
    )


def check_original_state_dict(shapes, original_config):
    """Compare {key: shape} of a checkpoint with what its config implies; raise `KeyMismatchError` listing
    missing, unexpected and misshapen tensors. Derived buffers the key table drops are allowed extras; the
    lm_head may be absent when the embeddings are tied."""
    expected = expected_original_shapes(original_config)
    rules = rules_for(llm_architecture(original_config))
    tied = bool(original_config["llm_config"].get("tie_word_embeddings", False))
    optional = {lm_head_key(original_config)} if tied else set()
    missing = sorted(set(expected) - set(shapes) - optional)
    unexpected = sorted(k for k in set(shapes) - set(expected) if not _dropped(rules, k))
    misshapen = sorted(
        f"{k} {tuple(shapes[k])} (config implies {expected[k]})"
        for k in set(shapes) & set(expected)
        if tuple(shapes[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(
            f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
            + (" ..." if len(unexpected) > 20 else "")
        )
    if misshapen:
        problems.append(f"wrong shapes ({len(misshapen)}): {'; '.join(misshapen[:10])}")
    if problems:
        raise KeyMismatchError(
            "the weights do not match the original NaViL layout for this config.json: " + " | ".join(problems)
        )


def _dropped(rules, key):
    rule, _ = match_source(rules, key)
    return rule is not None and not rule.targets
