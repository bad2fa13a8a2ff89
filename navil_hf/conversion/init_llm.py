"""`navil init-from-llm`: a pretrained text LLM -> a Hub-ready NaViL folder to start training from.

NaViL's first finding is that a native MLLM must start from a pretrained LLM. This builds that
starting checkpoint:

1. load the LLM -- a local Hugging Face folder of a Llama, Qwen2, Qwen3 or InternLM2 causal LM, or a
   GGUF file (transformers' GGUF loader dequantizes it);
2. copy its text weights; initialise every visual expert (q/k/v/o projections, q/k norms, FFN) as a
   copy of its text twin, so a visual token is first processed exactly like a text token (InternLM2:
   NaViL-2B chains the visual output projection after the text one, `o_proj_ve(o_proj(x))`, so there
   `o_proj_ve` starts as the identity). `visual_experts=False` (`--no-visual-experts`) builds no visual
   expert at all (`text_config.visual_experts=False`): every token goes through the text weights, so with
   `--vision-preset none` it is plain early fusion into the LLM;
3. add NaViL's 12 special tokens to the tokenizer; new embedding (and untied LM-head) rows are the
   mean of the trained rows, the special-token table starts equal to the plain embedding of its tokens;
4. build a fresh vision encoder and connector sized by a named preset (`VISION_PRESETS`);
5. keep the LLM's own chat template, extended for images (`processing_navil.extend_chat_template`);
6. verify before writing: on text-only prompts NaViL's logits equal the LLM's logits computed by
   transformers' own model class (float32, max-abs <= `TEXT_PARITY_TOLERANCE`); the folder is written
   next to OUT_DIR, reloaded through `AutoModel` (logits identical to the model in memory on a prompt
   with an image) and only then renamed into place.

InternLM2 is a Llama-architecture decoder with a fused, KV-head-grouped `wqkv`. Its folder ships its own
modeling code: with `trust_remote_code=True` that code is the reference; without it the reference is
transformers' `LlamaForCausalLM` on the unfused weights.
"""

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import ConversionError, VerificationError, first_line
from ..folders import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    SafetensorsFolder,
    check_output_dir,
    progress_bar,
    safetensors_files,
    staged_folder,
    transformers_progress_bars,
)
from ..hub import build_generation_config, meta_model, write_hub_folder, write_weights
from .keymap import (
    cast_view,
    compile_table,
    internlm2_decoder_keys,
    llm_decoder_keys,
    plan_conversion,
    rule_view,
)
from .surgery import DTYPES, resolve_dtype
from .tokenizer import load_tokenizer
from .verify import check_offloaded_logits

TEXT_PARITY_TOLERANCE = 1e-4
FAMILIES = ("llama", "qwen2", "qwen3", "internlm2")
PARITY_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    "The quick brown fox jumps over the lazy dog. 1 + 1 = 2; ünïcödé, 中文.",
)

# Vision encoder presets. Every preset: 16-px patches, 2x2 merge, RMSNorm, qkv bias, GELU, windows of
# 8x8 patches with full attention in the layers listed. `navil init-from-llm --list-presets` prints
# their parameter counts (vision encoder alone; the connector adds 4*width*(llm width) + llm width^2).
VISION_PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 fullatt_block_indexes=[1]),  # tests and smoke runs
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                  fullatt_block_indexes=[3, 7, 11]),  # ViT-S sized; the demo model
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 fullatt_block_indexes=[3, 7, 11]),  # ViT-B sized
    "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  fullatt_block_indexes=[5, 11, 17, 23]),  # ViT-L sized
    "navil-2b": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     fullatt_block_indexes=[7, 15, 23, 31]),  # ~0.6B, the size NaViL-2B pairs with its LLM
    # Early fusion (Apple's "Scaling Laws for Native Multimodal Models"): no encoder layers, the 16-px patches'
    # linear embedding (width 768 = 3 x 16 x 16, the raw patch size) -> 2x2 merge -> connector -> the LLM.
    "none": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=0, num_attention_heads=12,
                 fullatt_block_indexes=[]),
}  # fmt: skip
VISION_DEFAULTS = dict(patch_size=16, spatial_merge_size=2, qkv_bias=True, qk_normalization=False,
                       norm_type="rms_norm", layer_norm_eps=1e-6, hidden_act="gelu", window_size=8)  # fmt: skip
DEFAULT_PRESET = "base"
# LayerScale's starting value for a fresh encoder's blocks (CaiT): each block starts close to the identity,
# so the patch embeddings reach the connector little mixed and the first steps learn from them. At 1.0 a
# fresh 12-block encoder kept the demo model blind for hundreds of steps (issue 25: 80 steps on one-shape
# color questions, held-out accuracy 0.27 at 1.0, 0.63 at 0.1).
VISION_LAYER_SCALE = 0.1


def vision_preset_config(name):
    """The `NaViLVisionConfig` of a preset."""
    from configuration_navil import NaViLVisionConfig

    if name not in VISION_PRESETS:
        raise ConversionError(f"unknown vision preset {name!r}; choose one of {', '.join(VISION_PRESETS)}")
    return NaViLVisionConfig(**VISION_DEFAULTS, **VISION_PRESETS[name])


def vision_preset_parameters(name):
    """Parameter count of a preset's vision encoder (built on the meta device: no memory, no time)."""
    from modeling_navil import NaViLVisionModel

    with torch.device("meta"):
        model = NaViLVisionModel(vision_preset_config(name))
    return sum(p.numel() for p in model.parameters())


def describe_presets():
    lines = []
    for name, preset in VISION_PRESETS.items():
        count = vision_preset_parameters(name)
        lines.append(
            f"{name:9s} {count / 1e6:8.1f}M parameters: {preset['num_hidden_layers']} layers, width "
            f"{preset['hidden_size']}, {preset['num_attention_heads']} heads, FFN {preset['intermediate_size']}, "
            f"full attention in layers {preset['fullatt_block_indexes']}"
        )
    return "\n".join(lines)


@dataclass
class InitResult:
    out_dir: Path
    config: object
    family: str
    vision_preset: str
    dtype: torch.dtype
    parameters: dict  # part -> count
    added_tokens: list
    text_max_abs_diff: float | None
    verified: bool
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    notices: list = field(default_factory=list)  # foreign code left out of the folder
    visual_experts: bool = True  # False: no *_ve weights, every token through the text weights


# ---------------------------------------------------------------------------------------------------
# Reading the source LLM


@dataclass
class SourceLLM:
    name: str
    family: str
    config: object  # a transformers config (or, for InternLM2 without its code, a dict)
    state_dict: object  # a mapping, Hugging Face names (InternLM2: its own names), float32; lazy for folders
    tokenizer: object
    reference: object  # callable(input_ids) -> logits, transformers' own model class
    reference_class: str
    license: str | None
    generation_config: object | None


def _config_value(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def load_source(src, *, trust_remote_code=False, progress=False):
    """Load a Llama/Qwen2/Qwen3/InternLM2 folder or a GGUF file (float32)."""
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        return _load_gguf(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder or .gguf file")
    if not (src / CONFIG_FILE).is_file():
        raise ConversionError(f"{src} has no config.json: not a Hugging Face model folder")
    raw = json.loads((src / CONFIG_FILE).read_text())
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ConversionError(
            f"{src} holds a {family!r} model; init-from-llm supports {', '.join(FAMILIES)} causal LMs (or a GGUF file)"
        )
    tokenizer = load_tokenizer(src, trust_remote_code)
    license = _folder_license(src, raw)
    generation_config = _generation_config(src)
    if family == "internlm2" and not (trust_remote_code and raw.get("auto_map")):
        return _load_internlm2_without_code(src, raw, tokenizer, license, generation_config, progress)
    if not (trust_remote_code and raw.get("auto_map")):
        return _load_lazily(src, tokenizer, license, generation_config)
    safetensors_files(src)  # never a pickle, even one transformers would load
    model = _auto_causal_lm(str(src), trust_remote_code=trust_remote_code, use_safetensors=True)
    return SourceLLM(
        name=src.resolve().name,
        family=family,
        config=model.config,
        state_dict=model.state_dict(),
        tokenizer=tokenizer,
        reference=_reference(model),
        reference_class=type(model).__name__,
        license=license,
        generation_config=generation_config,
    )


def _auto_causal_lm(path, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except ImportError as e:  # e.g. GGUF without the `gguf` package
        raise ConversionError(f"cannot load {path}: {e}") from e
    return model.eval()


def _reference(model):
    def logits(input_ids):
        with torch.no_grad():
            return model(input_ids=input_ids).logits

    return logits


def _load_gguf(path):
    from transformers import AutoTokenizer

    try:
        import gguf  # noqa: F401 -- transformers' GGUF loader needs it
    except ImportError:
        raise ConversionError(f"reading {path.name} needs the `gguf` package: pip install gguf accelerate") from None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConversionError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        model = _auto_causal_lm(str(path.parent), gguf_file=path.name)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 -- the GGUF reader fails in many ways on a damaged file
        raise ConversionError(f"cannot read the GGUF file {path}: {first_line(e)}") from None
    family = model.config.model_type
    if family not in FAMILIES:
        raise ConversionError(f"{path.name} holds a {family!r} model; supported: {', '.join(FAMILIES)}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on load; ours is plain float
    return SourceLLM(
        name=path.name,
        family=family,
        config=config,
        state_dict=model.state_dict(),
        tokenizer=tokenizer,
        reference=_reference(model),
        reference_class=type(model).__name__,
        license=_gguf_license(path),
        generation_config=None,
    )


def _gguf_license(path):
    try:
        import gguf

        field_ = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(field_.contents()) if field_ is not None else None
    except Exception:  # noqa: BLE001 -- the license is informational
        return None


def _folder_license(src, raw):
    from ..hub import read_license

    return read_license(src) or raw.get("license")


def _generation_config(src):
    from transformers import GenerationConfig

    if not (Path(src) / GENERATION_CONFIG_FILE).is_file():
        return None
    return GenerationConfig.from_pretrained(str(src))


# A plain InternLM2 LLM -> the same decoder in Llama names: keymap's InternLM2 table, rooted elsewhere.
INTERNLM2_LLM_RULES = compile_table(internlm2_decoder_keys(source_root="", target_model="model", experts=False))


def internlm2_to_llama(state_dict, config):
    """InternLM2 tensors -> the same decoder in Llama names (exact: renames and the wqkv split), as a lazy
    view of `state_dict` (every name is checked first)."""
    heads = _config_value(config, "num_attention_heads")
    shapes = SimpleNamespace(
        num_attention_heads=heads,
        num_key_value_heads=_config_value(config, "num_key_value_heads") or heads,
        head_dim=_config_value(config, "hidden_size") // heads,
    )
    plan = plan_conversion(state_dict.keys(), INTERNLM2_LLM_RULES, layout="the InternLM2 layout")
    return rule_view(state_dict, plan, shapes)


def legacy_rope_parameters(config):
    """`rope_parameters` of a config that writes the legacy `rope_theta` + `rope_scaling` (InternLM2)."""
    from configuration_navil import rope_parameters_from_legacy

    return rope_parameters_from_legacy(_config_value(config, "rope_theta"), _config_value(config, "rope_scaling"))


def internlm2_llama_config(config):
    """The `LlamaConfig` of the same decoder as an InternLM2 config."""
    from transformers import LlamaConfig

    bias = bool(_config_value(config, "bias", False))
    if bias:
        raise ConversionError(
            "InternLM2 with bias=true has no Llama equivalent to check against; pass --trust-remote-code"
        )
    return LlamaConfig(
        vocab_size=_config_value(config, "vocab_size"),
        hidden_size=_config_value(config, "hidden_size"),
        intermediate_size=_config_value(config, "intermediate_size"),
        num_hidden_layers=_config_value(config, "num_hidden_layers"),
        num_attention_heads=_config_value(config, "num_attention_heads"),
        num_key_value_heads=_config_value(config, "num_key_value_heads"),
        hidden_act=_config_value(config, "hidden_act", "silu"),
        max_position_embeddings=_config_value(config, "max_position_embeddings", 2048),
        rms_norm_eps=_config_value(config, "rms_norm_eps", 1e-6),
        rope_parameters=legacy_rope_parameters(config),
        tie_word_embeddings=bool(_config_value(config, "tie_word_embeddings", False)),
        attention_bias=False,
    )


def _tensor_view(src):
    """The safetensors of a Hugging Face folder as a lazy float32 mapping: nothing is read until a tensor
    is needed."""
    safetensors_files(src)  # never a pickle, even one transformers would load
    return cast_view(SafetensorsFolder(src, check_finite=True), torch.float32)


def _tie_head(weights, config):
    """A tied LM head, which the folder leaves out, looks up the embedding (Llama names)."""
    if bool(_config_value(config, "tie_word_embeddings", False)) and "lm_head.weight" not in weights:
        weights.add("lm_head.weight", functools.partial(weights.__getitem__, "model.embed_tokens.weight"))
    return weights


def _offloaded_reference(model_class, config, weights):
    """transformers' own model for `config`, with no memory behind its weights: each module's weights are
    read from `weights` when it runs (accelerate's offload hooks), so the reference costs one layer."""
    from accelerate import cpu_offload

    with torch.device("meta"):
        model = model_class(config)
    model = model.to(torch.float32).eval()
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None:  # its (non-persistent) buffers are computed, not stored: build them for real
        model.model.rotary_emb = type(rotary)(config)
    cpu_offload(model, execution_device="cpu", state_dict=weights)
    return model


def _load_lazily(src, tokenizer, license, generation_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src))
    weights = _tie_head(_tensor_view(src), config)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return SourceLLM(
        name=src.resolve().name,
        family=config.model_type,
        config=config,
        state_dict=weights,
        tokenizer=tokenizer,
        reference=_reference(_offloaded_reference(model_class, config, weights)),
        reference_class=model_class.__name__,
        license=license,
        generation_config=generation_config,
    )


def _load_internlm2_without_code(src, raw, tokenizer, license, generation_config, progress):
    from transformers import LlamaForCausalLM

    llama_config = internlm2_llama_config(raw)
    state = _tensor_view(src)  # InternLM2 names; the reference reads them as Llama names
    weights = _tie_head(internlm2_to_llama(state, raw), llama_config)
    return SourceLLM(
        name=src.resolve().name,
        family="internlm2",
        config=raw,
        state_dict=state,
        tokenizer=tokenizer,
        reference=_reference(_offloaded_reference(LlamaForCausalLM, llama_config, weights)),
        reference_class="LlamaForCausalLM (InternLM2 weights, wqkv unfused)",
        license=license,
        generation_config=generation_config,
    )


# ---------------------------------------------------------------------------------------------------
# The NaViL text config and weights


def text_config_from(source):
    """`NaViLTextConfig` keyword arguments for the source LLM (vocabulary set later)."""
    config, family = source.config, source.family
    get = lambda name, default=None: _config_value(config, name, default)  # noqa: E731
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    layer_types = get("layer_types") or []
    if get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ConversionError(f"{source.name} uses sliding-window attention, which NaViL's text model does not have")
    if family == "internlm2":
        bias = bool(get("bias", False))
        rope_parameters = legacy_rope_parameters(config)
        qkv_bias, out_bias, mlp_bias, head_dim = bias, bias, False, hidden // heads
    else:
        rope_parameters = dict(get("rope_parameters") or {}) or legacy_rope_parameters(config)
        attention_bias = bool(get("attention_bias", False))
        if family == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias, out_bias = attention_bias, attention_bias
        mlp_bias = bool(get("mlp_bias", False))
        head_dim = get("head_dim") or hidden // heads
    if rope_parameters.get("rope_type") == "dynamic":
        raise ConversionError(f"{source.name} uses dynamic rope scaling; NaViL's text model supports static rope types")
    return dict(
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads,
        head_dim=head_dim,
        hidden_act=get("hidden_act", "silu"),
        max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        rope_parameters=rope_parameters,
        qk_norm=family == "qwen3",
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    )


@functools.cache
def _decoder_rules(visual_experts):
    return compile_table(llm_decoder_keys(visual_experts))


def navil_text_state_dict(hf_state_dict, tie_word_embeddings, visual_experts=True):
    """Hugging Face decoder tensors -> our text model's decoder layers and final norm through keymap's
    `llm_decoder_keys` table (every visual expert a copy of its text twin; none with `visual_experts=False`).
    A lazy view: each tensor is read from `hf_state_dict` when looked up (the embedding and LM head are
    resized by `build_navil`). Every name is checked first (`KeyMismatchError` for one the table lacks)."""
    plan = plan_conversion(hf_state_dict.keys(), _decoder_rules(visual_experts), layout="a Llama-named decoder")
    if not tie_word_embeddings and "lm_head.weight" not in hf_state_dict:
        raise ConversionError("the LLM has no lm_head.weight and does not tie its word embeddings")
    return rule_view(hf_state_dict, plan, None)


def add_navil_tokens(tokenizer):
    """Add the special tokens NaViL's prompts use as single special tokens; returns the ones added."""
    from transformers import AddedToken

    from configuration_navil import SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    new = [t for t in SPECIAL_TOKENS if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    vocab = tokenizer.get_vocab()
    split = [t for t in SPECIAL_TOKENS if tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]]
    if split:
        raise ConversionError(f"the tokenizer still splits {' '.join(split)} after adding them")
    return new


def _resize_rows(matrix, vocab_size, new_ids, trained_rows):
    """`matrix` grown to `vocab_size` rows; rows in `new_ids` (and grown rows) set to the mean trained row."""
    mean = matrix[:trained_rows].double().mean(0).to(matrix.dtype)
    if vocab_size > matrix.shape[0]:
        matrix = torch.cat([matrix, mean.expand(vocab_size - matrix.shape[0], -1)])
    else:
        matrix = matrix.clone()
    if new_ids:
        matrix[torch.tensor(new_ids)] = mean
    return matrix


def _init_connector(connector, std):
    """The connector the way transformers initialises linear layers: N(0, std) weights, zero biases."""
    with torch.no_grad():
        for module in (connector.linear_1, connector.linear_2):
            module.weight.normal_(0.0, std)
            module.bias.zero_()
        connector.norm.weight.fill_(1.0)
        connector.norm.bias.zero_()
    return connector


def resolve_chat_template(source, chat_template):
    """The LLM's chat template (or `chat_template`: a file or an original template name) extended for images."""
    from processing_navil import CHAT_TEMPLATES, extend_chat_template

    if chat_template is None:
        template = getattr(source.tokenizer, "chat_template", None)
        if not template:
            raise ConversionError(
                f"{source.name} has no chat template (a base model?); pass --chat-template FILE or one of "
                f"{', '.join(CHAT_TEMPLATES)}"
            )
        return None, extend_chat_template(template)
    check_chat_template_option(chat_template)
    if chat_template in CHAT_TEMPLATES:
        return chat_template, CHAT_TEMPLATES[chat_template]
    return None, extend_chat_template(Path(chat_template).read_text(encoding="utf-8"))


def check_chat_template_option(chat_template):
    """`--chat-template` must name an original template or an existing file (None: the LLM's own)."""
    from processing_navil import CHAT_TEMPLATES

    if chat_template is not None and chat_template not in CHAT_TEMPLATES and not Path(chat_template).is_file():
        raise ConversionError(
            f"--chat-template {chat_template}: no such file nor template name ({', '.join(CHAT_TEMPLATES)})"
        )


def build_navil(
    source,
    vision_preset,
    *,
    seed=0,
    chat_template=None,
    min_dynamic_patch=256,
    max_dynamic_patch=24576,
    held_dtype=None,
    visual_experts=True,
    vision_layer_scale=VISION_LAYER_SCALE,
    token_order="window",
):
    """(weights, config, processor, added tokens) of a NaViL built from `source` (with or without visual
    experts, `visual_experts`; the fresh encoder's LayerScale starting at `vision_layer_scale`): `weights` a lazy
    mapping in our key layout, float32 (the decoder read from the source when looked up; the resized
    embedding and LM head and the fresh vision encoder, connector and special table held). Tensors are
    float32, except the held embedding and LM head: `held_dtype` (the dtype that will be written, so
    nothing is lost; `cast_view(weights, torch.float32)` for float32 checks)."""
    from configuration_navil import SPECIAL_TOKENS, NaViLConfig, NaViLTextConfig, token_id_fields
    from modeling_navil import NaViLConnector, NaViLVisionModel
    from processing_navil import NaViLProcessor

    tokenizer = source.tokenizer
    template_name, template = resolve_chat_template(source, chat_template)
    trained_rows = len(tokenizer)
    added = add_navil_tokens(tokenizer)
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}

    text_kwargs = text_config_from(source)
    hf_state = source.state_dict
    if source.family == "internlm2":
        hf_state = internlm2_to_llama(hf_state, source.config)
    text_kwargs["visual_experts"] = visual_experts
    text_state = navil_text_state_dict(hf_state, text_kwargs["tie_word_embeddings"], visual_experts)
    source_embed = hf_state["model.embed_tokens.weight"]
    source_vocab = source_embed.shape[0]
    trained_rows = min(trained_rows, source_vocab)
    vocab_size = max(source_vocab, len(tokenizer))
    new_ids = [ids[t] for t in added]
    # The embedding and LM head are resized (new rows: the mean trained row), so they are held; every
    # other tensor stays a lazy read of the source.
    held = held_dtype or torch.float32
    embed = _resize_rows(source_embed, vocab_size, new_ids, trained_rows).to(held)
    del source_embed
    text_state.add("model.language_model.embed_tokens.weight", functools.partial(_identity, embed))
    if text_kwargs["tie_word_embeddings"]:
        text_state.add("lm_head.weight", functools.partial(_identity, embed))
    else:
        head = _resize_rows(hf_state["lm_head.weight"], vocab_size, new_ids, trained_rows).to(held)
        text_state.add("lm_head.weight", functools.partial(_identity, head))

    if source.family == "internlm2" and visual_experts:
        # NaViL-2B's InternLM2 layout: visual tokens get o_proj_ve(o_proj(x)) (SPEC §8.2). With o_proj_ve
        # the identity the visual path starts equal to the text path, and the folder converts back to
        # the original layout (`navil to-original`).
        text_kwargs["chain_visual_output"] = True
        hidden = text_kwargs["hidden_size"]
        for key in [k for k in text_state.keys() if k.endswith("self_attn.o_proj_ve.weight")]:
            text_state.add(key, functools.partial(torch.eye, hidden))
        for key in [k for k in text_state.keys() if k.endswith("self_attn.o_proj_ve.bias")]:
            text_state.add(key, functools.partial(torch.zeros, hidden))

    special = {}
    if source.generation_config is not None:
        special = {
            k: getattr(source.generation_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
    text_config = NaViLTextConfig(
        vocab_size=vocab_size,
        bos_token_id=special.get("bos_token_id") or tokenizer.bos_token_id,
        eos_token_id=special.get("eos_token_id") or tokenizer.eos_token_id,
        pad_token_id=special.get("pad_token_id") or tokenizer.pad_token_id,
        **text_kwargs,
    )
    vision_config = vision_preset_config(vision_preset)
    vision_config.initializer_factor = vision_layer_scale  # the blocks' ls1 / ls2 start there
    vision_config.token_order = token_order
    config = NaViLConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        **token_id_fields(ids),
        template=template_name,
        min_dynamic_patch=min_dynamic_patch,
        max_dynamic_patch=max_dynamic_patch,
        initialized_from={"llm": source.name, "family": source.family, "vision_preset": vision_preset},
        # A model built to be trained: generated special tokens see the table too (SPEC §10).
        special_token_table="everywhere",
    )

    torch.manual_seed(seed)
    vision = NaViLVisionModel(config.vision_config)
    connector = _init_connector(NaViLConnector(config), config.text_config.initializer_range)
    state = text_state
    fresh = {f"model.vision_model.{k}": v for k, v in vision.state_dict().items()}
    fresh.update({f"model.connector.{k}": v for k, v in connector.state_dict().items()})
    # The special-token table starts as the plain embedding of its tokens: prompt and generated
    # occurrences of a special token (SPEC §8.3) look the same until training separates them.
    fresh["model.special_token_embedding.weight"] = embed[torch.tensor(config.special_token_ids)].float()
    for key, tensor in fresh.items():
        state.add(key, functools.partial(_identity, tensor))
    processor = NaViLProcessor.for_config(config, tokenizer, chat_template=template)
    return state, config, processor, added


def _identity(value):
    return value


def check_text_parity(model, source, tokenizer, new_token_ids=(), attn_implementation="sdpa"):
    """Max-abs difference between NaViL's and the source LLM's logits on text-only prompts, over the
    source's vocabulary except the rows NaViL's new tokens took over (unused padding rows of the
    source); raises `VerificationError` above `TEXT_PARITY_TOLERANCE`."""
    worst, lengths = 0.0, []
    model.config._attn_implementation = attn_implementation
    for prompt in PARITY_PROMPTS:
        if isinstance(prompt, str):
            input_ids = torch.tensor([tokenizer.encode(prompt)])
        else:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        expected = source.reference(input_ids)
        with torch.no_grad():
            got = model(input_ids=input_ids).logits
        if not torch.isfinite(got).all():
            raise VerificationError("NaViL's logits on a text-only prompt are not finite")
        keep = torch.ones(expected.shape[-1], dtype=torch.bool)
        keep[[i for i in new_token_ids if i < len(keep)]] = False
        diff = (got[..., : len(keep)][..., keep] - expected[..., keep]).abs().max().item()
        worst, lengths = max(worst, diff), lengths + [input_ids.shape[1]]
    if not worst <= TEXT_PARITY_TOLERANCE:
        raise VerificationError(
            f"NaViL's logits differ from {source.reference_class}'s on text-only prompts by {worst:.3g} "
            f"(tolerance {TEXT_PARITY_TOLERANCE:g})"
        )
    return worst, (
        f"max-abs {worst:.2g} vs {source.reference_class} on {len(lengths)} text-only prompts ({lengths} tokens, "
        f"{int(keep.sum())} vocabulary columns)"
    )


def init_from_llm(
    src,
    out_dir,
    *,
    vision_preset=DEFAULT_PRESET,
    dtype="auto",
    force=False,
    verify=True,
    progress=False,
    seed=0,
    chat_template=None,
    min_dynamic_patch=256,
    max_dynamic_patch=24576,
    trust_remote_code=False,
    attn_implementation="sdpa",
    max_shard_size="5GB",
    visual_experts=True,
    vision_layer_scale=VISION_LAYER_SCALE,
    token_order="window",
):
    """Build a NaViL from the LLM at `src` (folder or .gguf) and write it to `out_dir` (see the module
    docstring). `dtype="auto"` keeps the LLM's dtype (float32 for a GGUF file, which is dequantized).
    `visual_experts=False`: no visual experts (every token through the text weights).
    `vision_layer_scale`: the starting value of the fresh encoder blocks' LayerScale (`VISION_LAYER_SCALE`).
    `token_order="raster"`: visual tokens reach the LLM in the prompt's row order (`vision_config.token_order`;
    the original's window order is the default, and the only one `navil to-original` writes)."""
    with transformers_progress_bars(progress):
        return _init_from_llm(
            src, out_dir, vision_preset, dtype, force, verify, progress, seed, chat_template, min_dynamic_patch,
            max_dynamic_patch, trust_remote_code, attn_implementation, max_shard_size, visual_experts,
            vision_layer_scale, token_order,
        )  # fmt: skip


def _init_from_llm(
    src, out_dir, vision_preset, dtype, force, verify, progress, seed, chat_template, min_dynamic_patch,
    max_dynamic_patch, trust_remote_code, attn_implementation, max_shard_size, visual_experts, vision_layer_scale,
    token_order,
):  # fmt: skip
    start = time.perf_counter()
    out_dir = check_output_dir(out_dir, force, sources=(src,))
    # Option mistakes fail before the (slow) load.
    vision_preset_config(vision_preset)
    if not (isinstance(vision_layer_scale, (int, float)) and 0 < vision_layer_scale <= 1):
        raise ConversionError(f"--vision-layer-scale must be in (0, 1], got {vision_layer_scale!r}")
    from configuration_navil import TOKEN_ORDERS

    if token_order not in TOKEN_ORDERS:
        raise ConversionError(f"--token-order must be one of {', '.join(TOKEN_ORDERS)}, got {token_order!r}")
    check_chat_template_option(chat_template)
    if min_dynamic_patch > max_dynamic_patch:
        raise ConversionError(
            f"--min-dynamic-patch ({min_dynamic_patch}) is larger than --max-dynamic-patch ({max_dynamic_patch})"
        )
    source = load_source(src, trust_remote_code=trust_remote_code, progress=progress)
    target = resolve_dtype(dtype, source_dtype(source))
    weights, config, processor, added = build_navil(
        source, vision_preset, seed=seed, chat_template=chat_template,
        min_dynamic_patch=min_dynamic_patch, max_dynamic_patch=max_dynamic_patch, held_dtype=target,
        visual_experts=visual_experts, vision_layer_scale=vision_layer_scale, token_order=token_order,
    )  # fmt: skip
    tokenizer = processor.tokenizer
    # Our model for the checks, with no memory behind its weights: each module's weights are looked
    # up in `weights` (read from the source, lazily) when it runs.
    from accelerate import cpu_offload

    model = meta_model(config, torch.float32)
    cpu_offload(model, execution_device="cpu", state_dict=cast_view(weights, torch.float32))
    checks, worst, notices = {}, None, []
    if verify:
        new_ids = tokenizer.convert_tokens_to_ids(added)
        worst, checks["text parity"] = check_text_parity(model, source, tokenizer, new_ids, attn_implementation)
    parameters = {
        "vision encoder": sum(p.numel() for p in model.model.vision_model.parameters()),
        "connector": sum(p.numel() for p in model.model.connector.parameters()),
        "language model": sum(p.numel() for p in model.model.language_model.parameters()),
    }
    del model
    source_name, source_license, family = source.name, source.license, source.family
    config.dtype = target
    text = config.text_config
    eos = text.eos_token_id
    stop = " or ".join(f"`{tokenizer.convert_ids_to_tokens(i)}`" for i in (eos if isinstance(eos, list) else [eos]))
    card = init_model_card(config, source=source_name, vision_preset=vision_preset, license=source_license,
                           dtype=target, parameters=parameters, verified=verify, stop=stop)  # fmt: skip
    stored = cast_view(weights, target)
    with staged_folder(out_dir, force) as tmp:
        num_written = write_weights(tmp, stored, config, target, max_shard_size, verify, progress)
        with progress_bar(progress, total=7, desc="writing", unit="file") as bar:
            write_hub_folder(
                None, config, tokenizer, tmp, processor=processor,
                generation_config=build_generation_config(
                    tokenizer, text.eos_token_id, text.pad_token_id, text.bos_token_id
                ), model_card=card, progress=lambda description: bar.update(), notices=notices,
            )  # fmt: skip
        if verify:
            checks["written = converted"] = f"{num_written} written tensors read back bit for bit"
            checks["logits"] = check_offloaded_logits(tmp, stored, config, target, attn_implementation)
    del source  # the reference model's hooks and the lazy source
    return InitResult(
        out_dir=out_dir, config=config, family=family, vision_preset=vision_preset, dtype=target,
        parameters=parameters, added_tokens=added, text_max_abs_diff=worst, verified=verify, checks=checks,
        seconds=time.perf_counter() - start, notices=notices, visual_experts=visual_experts,
    )  # fmt: skip


def source_dtype(source):
    """The dtype the LLM's config names (float32 when it names none, e.g. a dequantized GGUF)."""
    name = _config_value(source.config, "dtype")
    if name is None and isinstance(source.config, dict):
        name = source.config.get("torch_dtype")  # older config.json files
    if isinstance(name, torch.dtype):
        return name
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32) if name else torch.float32


def init_model_card(config, *, source, vision_preset, license, dtype, parameters, verified, stop):
    """README.md for a folder built by `navil init-from-llm`."""
    from ..hub import card_front_matter, usage_section

    text = config.text_config
    front = card_front_matter(license)
    counts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in parameters.items())
    checked = (
        "Before writing, its logits on text-only prompts were checked against the LLM's own "
        f"(transformers, float32, max-abs <= {TEXT_PARITY_TOLERANCE:g}).\n"
        if verified
        else ""
    )
    vision = config.vision_config
    if getattr(text, "visual_experts", True):
        intro = (
            "A NaViL-architecture model (OpenGVLab, NeurIPS 2025: a native-resolution vision encoder feeding an LLM "
            "whose every layer has separate attention projections and FFN for visual tokens)"
        )
        chained = " (the chained visual output projection of NaViL-2B's InternLM2 layout as the identity)"
        experts = (
            f"text weights copied from `{source}`; every visual expert (q/k/v/o projections, q/k norms, FFN) "
            f"initialised as a copy of its text twin{chained if text.chain_visual_output else ''}"
        )
    else:
        intro = (
            "A NaViL-architecture model without visual experts (OpenGVLab, NeurIPS 2025: a native-resolution vision "
            "encoder feeding an LLM; this one has no separate weights for visual tokens, image and text tokens alike "
            "go through the LLM's own weights)"
        )
        experts = (
            f"text weights copied from `{source}`; no visual experts (`text_config.visual_experts: false`): nothing "
            "is copied into `*_ve` weights, there are none"
        )
    body = f"""# NaViL initialised from {source}

{intro} built with `navil init-from-llm` from the pretrained LLM `{source}`.

**It is a starting point for training, not a trained multimodal model: the vision encoder and connector are randomly initialised** (vision preset `{vision_preset}`), so the model cannot see images yet. Text-only, it answers exactly as `{source}` does.

How it was made:
- {experts};
- NaViL's 12 special tokens added to the tokenizer; new embedding rows are the mean of the trained rows;
- the LLM's own chat template, extended so `{{"type": "image"}}` items become `<image>` placeholders;
- vision encoder: preset `{vision_preset}`, {vision.num_hidden_layers} layers, width {vision.hidden_size};
- language model: {text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary {text.vocab_size};
- parameters: {counts}; weights {str(dtype).replace("torch.", "")}.

{checked}
{usage_section(stop)}"""
    if license:
        body += f"\n## License\n\n`{source}` is released under the `{license}` license; the copied weights keep it.\n"
    return "\n".join(front) + body
