"""NaViL's parameters by part, and which parts train (freeze presets for NaViL's training stages).

Parts of a `NaViLForConditionalGeneration` (names as `named_parameters` gives them; a PEFT wrapper's
prefixes and LoRA's own names are understood):

* `vision` -- the vision encoder (`model.vision_model`);
* `connector` -- the 2x2-merge MLP (`model.connector`);
* `special_tokens` -- the 12 special-token embeddings (`model.special_token_embedding`);
* `embeddings` -- the token embedding (`model.language_model.embed_tokens`);
* `visual_experts` -- every `*_ve` projection, q/k norm and FFN of the decoder layers (empty in a model
  without visual experts, `text_config.visual_experts=False`: naming it trains nothing, and `stage1` there
  trains the vision encoder, the connector and the special-token table with the whole LLM frozen);
* `text` -- the rest of the decoder (text attention and FFN, norms);
* `lm_head` -- the output projection (the embedding itself when tied: it is one tensor).
"""

from __future__ import annotations

import re

PARTS = ("vision", "connector", "special_tokens", "embeddings", "visual_experts", "text", "lm_head")

# NaViL's stages (paper, §3.3): pre-training trains the vision encoder, the connector and the visual
# experts (initialised from the LLM) with the LLM's text weights frozen; supervised fine-tuning trains
# everything. Preset names never collide with part names (a part always means itself).
PRESETS = {
    "full": PARTS,
    "stage1": ("vision", "connector", "special_tokens", "visual_experts"),
    "stage2": PARTS,
    "encoder": ("vision", "connector"),
    "llm": ("text", "embeddings", "lm_head"),
}
assert not set(PRESETS) & set(PARTS)

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")
_VISUAL_EXPERT = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj_ve|self_attn\.[qk]_norm_ve|mlp_ve)\b")
_PREFIXES = (
    ("model.vision_model.", "vision"),
    ("model.connector.", "connector"),
    ("model.special_token_embedding.", "special_tokens"),
    ("model.language_model.embed_tokens.", "embeddings"),
    ("lm_head.", "lm_head"),
)


def parameter_part(name: str) -> str:
    """The part (`PARTS`) a parameter (or module) name belongs to."""
    name = _PEFT_PREFIX.sub("", name)
    for prefix, part in _PREFIXES:
        if name.startswith(prefix):
            return part
    if name.startswith("model.language_model."):
        return "visual_experts" if _VISUAL_EXPERT.search(name) else "text"
    raise ValueError(f"parameter {name!r} belongs to no part of a NaViL model")


def resolve_parts(spec) -> tuple[str, ...]:
    """`spec`: a preset name (`PRESETS`), a part name or a list of part / preset names."""
    items = [spec] if isinstance(spec, str) else list(spec or ())
    parts = []
    for item in items:
        if item in PRESETS:
            parts += PRESETS[item]
        elif item in PARTS:
            parts.append(item)
        else:
            raise ValueError(
                f"unknown part or preset {item!r}: parts are {', '.join(PARTS)}; presets {', '.join(PRESETS)}"
            )
    return tuple(p for p in PARTS if p in parts)


def set_trainable(model, parts) -> dict[str, int]:
    """Train exactly the parameters of `parts` (every other one frozen); returns trainable counts per
    part (0 for a part the model lacks, e.g. `visual_experts` without experts). A tied embedding / LM head
    trains when either part does."""
    parts = set(resolve_parts(parts))
    counts = dict.fromkeys(PARTS, 0)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))  # what the model ties by
    if tied and parts & {"embeddings", "lm_head"}:
        parts |= {"embeddings", "lm_head"}
    for name, param in model.named_parameters():
        part = parameter_part(name)
        param.requires_grad_(part in parts)
        if param.requires_grad:
            counts[part] += param.numel()
    return counts


def linear_modules(model, parts) -> list[str]:
    """Names of the `nn.Linear` modules of `parts` (LoRA's targets)."""
    from torch import nn

    parts = set(resolve_parts(parts))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and parameter_part(name + ".weight") in parts
    ]
