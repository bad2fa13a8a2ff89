"""The original OpenGVLab NaViL checkpoint (SPEC §7): reading the folder, mapping its config to ours and
the tensor names and shapes its config implies."""

import json
from pathlib import Path

from configuration_navil import (
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_FRAME_BREAK_TOKEN,
    IMAGE_LINE_BREAK_TOKEN,
    IMAGE_START_TOKEN,
    SPECIAL_TOKENS,
    NaViLConfig,
)

from .errors import ConversionError
from .keymap import INTERNLM2, LLM_KEYS, QWEN3, KeyMismatchError, match_source, rules_for

ORIGINAL_MODEL_TYPE = "navil_chat"
SUPPORTED_LLM_ARCHITECTURES = tuple(LLM_KEYS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"

VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "patch_size", "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "hidden_act",
    "fullatt_block_indexes", "window_size", "initializer_range", "initializer_factor",
)  # fmt: skip
REQUIRED_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOP_LEVEL_FIELDS = ("downsample_ratio", "template", "min_dynamic_patch", "max_dynamic_patch", "scale_downsample_ratio")


class OriginalCheckpointError(ConversionError):
    """The folder is not a readable original NaViL checkpoint."""


# ---------------------------------------------------------------------------------------------------
# Reading the folder


def load_original_config(original_dir):
    original_dir = Path(original_dir)
    if not original_dir.is_dir():
        raise OriginalCheckpointError(f"{original_dir} is not a directory")
    path = original_dir / "config.json"
    if not path.is_file():
        raise OriginalCheckpointError(f"{original_dir} has no config.json: not an original NaViL checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OriginalCheckpointError(f"{path} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type != ORIGINAL_MODEL_TYPE:
        hint = " (this folder is already in our format)" if model_type == NaViLConfig.model_type else ""
        raise OriginalCheckpointError(
            f"{path} has model_type {model_type!r}, expected {ORIGINAL_MODEL_TYPE!r} "
            f"(an original OpenGVLab NaViL checkpoint){hint}"
        )
    for section in ("vision_config", "llm_config"):
        if not isinstance(config.get(section), dict):
            raise OriginalCheckpointError(f"{path} has no {section} section")
    return config


def weight_files(original_dir):
    """The safetensors files of the checkpoint (from the shard index if there is one)."""
    original_dir = Path(original_dir)
    index = original_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (original_dir / f).is_file()]
        if missing:
            raise OriginalCheckpointError(f"{index} lists shards that are not in the folder: {', '.join(missing)}")
        return [original_dir / f for f in files]
    files = sorted(original_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in original_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise OriginalCheckpointError(
            f"{original_dir} holds only pickled PyTorch weights ({', '.join(pickles)}); refusing to unpickle them "
            "(loading a pickle can run arbitrary code). Re-save the checkpoint as safetensors first."
        )
    raise OriginalCheckpointError(f"{original_dir} has no *.safetensors weights")


def load_original_state_dict(original_dir, progress=None):
    """All tensors of the checkpoint, by original key. `progress(n)` is called per tensor read."""
    from safetensors import safe_open

    state_dict = {}
    for path in weight_files(original_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in state_dict:
                    raise OriginalCheckpointError(f"tensor {key} appears in more than one shard (again in {path.name})")
                state_dict[key] = f.get_tensor(key)
                if progress is not None:
                    progress()
    index = Path(original_dir) / INDEX_FILE
    if index.is_file():
        listed = set(json.loads(index.read_text()).get("weight_map", {}))
        if listed != set(state_dict):
            raise OriginalCheckpointError(
                f"{index} does not match the shards: listed but absent: {sorted(listed - set(state_dict))[:10]}, "
                f"present but unlisted: {sorted(set(state_dict) - listed)[:10]}"
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


def rope_parameters(llm_config):
    params = dict(llm_config.get("rope_scaling") or {})
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = llm_config.get("rope_theta")
    return {"rope_type": rope_type, "rope_theta": float(10000.0 if theta is None else theta), **params}


def convert_config(original_config, token_ids, fold_visual_output=False):
    """Our `NaViLConfig` for an original config dict. `token_ids` maps token strings to ids
    (`special_token_ids(tokenizer)`). InternLM2's visual output chain is kept (`chain_visual_output`)
    unless `fold_visual_output`."""
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
        "rope_parameters": rope_parameters(llm),
        "qk_norm": arch == QWEN3,
        "attention_bias": bias,
        "attention_out_bias": bias,
        "chain_visual_output": arch == INTERNLM2 and not fold_visual_output,
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        "bos_token_id": llm.get("bos_token_id"),
        "eos_token_id": llm.get("eos_token_id"),
        "pad_token_id": llm.get("pad_token_id"),
    }
    if "initializer_range" in llm:
        text_config["initializer_range"] = llm["initializer_range"]

    top = {k: original_config[k] for k in TOP_LEVEL_FIELDS if k in original_config}
    top["downsample_ratio"] = downsample_ratio
    try:
        return _navil_config(vision_config, text_config, token_ids, top)
    except ValueError as e:
        raise OriginalCheckpointError(f"config.json cannot be mapped: {e}") from None


def _navil_config(vision_config, text_config, token_ids, top):
    return NaViLConfig(
        vision_config=vision_config,
        text_config=text_config,
        special_token_ids=[token_ids[t] for t in SPECIAL_TOKENS],
        image_token_id=token_ids[IMAGE_CONTEXT_TOKEN],
        image_start_token_id=token_ids[IMAGE_START_TOKEN],
        image_end_token_id=token_ids[IMAGE_END_TOKEN],
        image_line_break_token_id=token_ids[IMAGE_LINE_BREAK_TOKEN],
        image_frame_break_token_id=token_ids[IMAGE_FRAME_BREAK_TOKEN],
        architectures=["NaViLForConditionalGeneration"],
        **top,
    )


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
