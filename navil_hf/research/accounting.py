"""Parameter and FLOP accounting for NaViL: what each component holds, what each kind of token uses, and
what a forward pass (or a training step) over given images and text costs.

    from navil_hf.research.accounting import count_parameters, count_flops, summary
    count_parameters(config_or_model)                      # per component: total, trainable, active
    count_flops(config, images=[(1024, 768)], text_tokens=200, training=True)
    print(summary(config, images=[(1024, 768)], text_tokens=200))

Everything is computed from the config alone (nothing is built, no weights are read); a model is counted from
its own tensors. The components, token types and the conventions of each count are described in
docs/research/accounting.md; the command line is `navil params` (`navil_hf/commands/params.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from navil_hf.training.parts import PARTS, parameter_part, resolve_parts

TOKEN_TYPES = ("text", "visual")
FLOP_COMPONENTS = ("vision", "vision_attention", "connector", "text", "visual_experts", "llm_attention", "lm_head")
CAUSAL_CONVENTIONS = ("exact", "half", "full")
LM_HEAD_POSITIONS = ("all", "text", "last", "none")
CONFIG_FILE = "config.json"

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")
# Parameters of the `text` part that visual tokens use as well.
_SHARED_NORM = re.compile(r"^model\.language_model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)\.")
_TEXT_OUTPUT = re.compile(r"^model\.language_model\.layers\.\d+\.self_attn\.o_proj\.")


def has_visual_experts(config) -> bool:
    """Whether the decoder layers of `config` (a `NaViLConfig`) carry visual experts (config.json files
    written before the switch existed have them)."""
    return bool(getattr(config.text_config, "visual_experts", True))


# ---------------------------------------------------------------------------------------------------
# Parameters


def parameter_inventory(config) -> dict[str, int]:
    """`{name: numel}` of every parameter `NaViLForConditionalGeneration(config)` has, as
    `named_parameters` names them (a tied head appears once, as the embedding), from the config alone."""
    vc, tc = config.vision_config, config.text_config
    sizes: dict[str, int] = {}

    def linear(name, n_in, n_out, bias):
        sizes[f"{name}.weight"] = n_in * n_out
        if bias:
            sizes[f"{name}.bias"] = n_out

    def norm(name, dim, bias=False):
        sizes[f"{name}.weight"] = dim
        if bias:
            sizes[f"{name}.bias"] = dim

    c = vc.hidden_size
    linear("model.vision_model.patch_embed", vc.num_channels * vc.patch_size**2, c, True)
    for i in range(vc.num_hidden_layers):
        layer = f"model.vision_model.layers.{i}"
        for name in ("norm1", "norm2"):
            norm(f"{layer}.{name}", c, bias=vc.norm_type == "layer_norm")
        linear(f"{layer}.attn.qkv", c, 3 * c, vc.qkv_bias)
        linear(f"{layer}.attn.proj", c, c, True)
        if vc.qk_normalization:
            norm(f"{layer}.attn.q_norm", c)
            norm(f"{layer}.attn.k_norm", c)
        linear(f"{layer}.mlp.fc1", c, vc.intermediate_size, True)
        linear(f"{layer}.mlp.fc2", vc.intermediate_size, c, True)
        sizes[f"{layer}.ls1"] = sizes[f"{layer}.ls2"] = c

    h = tc.hidden_size
    merged = c * vc.spatial_merge_size**2
    norm("model.connector.norm", merged, bias=True)
    linear("model.connector.linear_1", merged, h, True)
    linear("model.connector.linear_2", h, h, True)
    sizes["model.special_token_embedding.weight"] = 12 * h
    sizes["model.language_model.embed_tokens.weight"] = tc.vocab_size * h
    q_dim, kv_dim = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    experts = has_visual_experts(config)
    suffixes = ("", "_ve") if experts else ("",)
    for i in range(tc.num_hidden_layers):
        layer = f"model.language_model.layers.{i}"
        for suffix in suffixes:
            linear(f"{layer}.self_attn.q_proj{suffix}", h, q_dim, tc.attention_bias)
            linear(f"{layer}.self_attn.k_proj{suffix}", h, kv_dim, tc.attention_bias)
            linear(f"{layer}.self_attn.v_proj{suffix}", h, kv_dim, tc.attention_bias)
            o_in = h if suffix and tc.chain_visual_output else q_dim
            linear(f"{layer}.self_attn.o_proj{suffix}", o_in, h, tc.attention_out_bias)
        if tc.qk_norm:
            for name in ("q_norm", "k_norm", "q_norm_ve", "k_norm_ve")[: 2 * len(suffixes)]:
                norm(f"{layer}.self_attn.{name}", tc.head_dim)
        for mlp in ("mlp", "mlp_ve")[: len(suffixes)]:
            linear(f"{layer}.{mlp}.gate_proj", h, tc.intermediate_size, tc.mlp_bias)
            linear(f"{layer}.{mlp}.up_proj", h, tc.intermediate_size, tc.mlp_bias)
            linear(f"{layer}.{mlp}.down_proj", tc.intermediate_size, h, tc.mlp_bias)
        norm(f"{layer}.input_layernorm", h)
        norm(f"{layer}.post_attention_layernorm", h)
    norm("model.language_model.norm", h)
    if not tied_embeddings(config):
        sizes["lm_head.weight"] = tc.vocab_size * h
    return sizes


def tied_embeddings(config) -> bool:
    """Whether the model built from `config` ties its LM head to the embedding (transformers reads the
    top-level `tie_word_embeddings`)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def _token_types_using(
    name: str, part: str, chain: bool, tied: bool, logits_at_visual: bool, experts: bool = True
) -> tuple[str, ...]:
    """The token types whose computation uses parameter `name` (docs/research/accounting.md, "Parameter
    conventions")."""
    name = _PEFT_PREFIX.sub("", name)
    head = ("text", "visual") if logits_at_visual else ("text",)
    if part in ("vision", "connector", "visual_experts"):
        return ("visual",)
    if part == "text":
        if not experts or _SHARED_NORM.match(name) or (chain and _TEXT_OUTPUT.match(name)):
            return ("text", "visual")
        return ("text",)
    if part == "lm_head" or (part == "embeddings" and tied):
        return head
    if part == "embeddings":
        return ("text",)
    return ()  # special_tokens


@dataclass
class ParameterCount:
    """Parameters per component (`PARTS`): `total`, `trainable` and `active[token_type]` (the parameters a
    token of that type is computed with; docs/research/accounting.md). `head` is the LM head's matrix, also
    when tied (then counted under `embeddings`)."""

    total: dict[str, int]
    trainable: dict[str, int]
    active: dict[str, dict[str, int]]
    tied: bool
    head: int
    chain_visual_output: bool
    logits_at_visual: bool = False
    visual_experts: bool = True

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable.values())

    def active_params(self, token_type: str, include_embeddings: bool = True) -> int:
        """Parameters a token of `token_type` uses, with or without the embedding table (a lookup; when
        tied it is the head and always counts)."""
        count = sum(self.active[token_type].values())
        if not include_embeddings and not self.tied:
            count -= self.active[token_type]["embeddings"]
        return count

    def non_embedding_params(self) -> int:
        """All parameters but the lookup tables (`embeddings` unless tied, `special_tokens`)."""
        lookups = self.total["special_tokens"] + (0 if self.tied else self.total["embeddings"])
        return self.total_params - lookups

    def to_dict(self) -> dict:
        return {
            "components": {
                part: {
                    "total": self.total[part],
                    "trainable": self.trainable[part],
                    **{f"active_{t}": self.active[t][part] for t in TOKEN_TYPES},
                }
                for part in PARTS
            },
            "total": self.total_params,
            "trainable": self.trainable_params,
            "non_embedding": self.non_embedding_params(),
            "active": {
                t: {"with_embeddings": self.active_params(t), "without_embeddings": self.active_params(t, False)}
                for t in TOKEN_TYPES
            },
            "tied_embeddings": self.tied,
            "lm_head_matrix": self.head,
            "chain_visual_output": self.chain_visual_output,
            "logits_at_visual": self.logits_at_visual,
            "visual_experts": self.visual_experts,
        }


def _is_model(obj) -> bool:
    return hasattr(obj, "named_parameters") and hasattr(obj, "config")


def _config_of(model_or_config):
    if _is_model(model_or_config):
        return model_or_config.config
    if isinstance(model_or_config, (str, Path)):
        return load_config(model_or_config)
    if isinstance(model_or_config, dict):
        from configuration_navil import NaViLConfig

        return NaViLConfig(**model_or_config)
    return model_or_config


def count_parameters(model_or_config, *, trainable=None, logits_at_visual: bool = False) -> ParameterCount:
    """Parameters per component of a model (its tensors: `numel`, `requires_grad`) or of a config (a
    `NaViLConfig`, a dict, or a folder / config.json path: computed, nothing built).

    `trainable`: a part, a preset or a list of them (`navil_hf.training.parts`): count as trainable what
    `set_trainable` would train (a tied embedding trains with either `embeddings` or `lm_head`). Default:
    a model's `requires_grad`, everything for a config. `logits_at_visual`: count the LM head as used by
    visual tokens too."""
    config = _config_of(model_or_config)
    chain = bool(config.text_config.chain_visual_output)
    experts = has_visual_experts(config)
    if _is_model(model_or_config):
        model = model_or_config
        params = list(model.named_parameters())  # a tied head once, as the embedding
        sizes = {name: p.numel() for name, p in params}
        grads = {name: p.requires_grad for name, p in params}
        head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = head_module is not None and embed is not None and head_module.weight is embed.weight
        head = head_module.weight.numel() if head_module is not None else 0
    else:
        sizes = parameter_inventory(config)
        grads = dict.fromkeys(sizes, True)
        tied = tied_embeddings(config)
        head = config.text_config.vocab_size * config.text_config.hidden_size
    if trainable is not None:
        parts = set(resolve_parts(trainable))
        if tied and parts & {"embeddings", "lm_head"}:
            parts |= {"embeddings", "lm_head"}
        grads = {name: parameter_part(name) in parts for name in sizes}
    total = dict.fromkeys(PARTS, 0)
    trained = dict.fromkeys(PARTS, 0)
    active = {t: dict.fromkeys(PARTS, 0) for t in TOKEN_TYPES}
    for name, n in sizes.items():
        part = parameter_part(name)
        total[part] += n
        if grads[name]:
            trained[part] += n
        for token_type in _token_types_using(name, part, chain, tied, logits_at_visual, experts):
            active[token_type][part] += n
    return ParameterCount(total, trained, active, tied, head, chain, logits_at_visual, experts)


# ---------------------------------------------------------------------------------------------------
# Images and the token sequence


@dataclass
class _Image:
    """One image: its scales as `image_grid_thw` rows `(t, h, w)` (patches)."""

    scales: list[tuple[int, int, int]]

    def context_tokens(self, merge: int) -> int:
        return sum(t * h * w // (merge * merge) for t, h, w in self.scales)

    def token_types(self, merge: int) -> list[int]:
        """1 (visual) / 0 (text) for the image's prompt tokens in order (SPEC §3). A row with t > 1 (the
        processor never emits one) is taken as t frames, each laid out like a scale."""
        types = [1]  # <img>
        for t, h, w in self.scales:
            for _ in range(t):
                types += ([1] * (w // merge) + [0]) * (h // merge) + [0]  # rows + line breaks, frame break
        return [*types, 0]  # </img>


def _image_scales(config, images, grids, num_scales, min_pixels, max_pixels, multi_scale) -> list[_Image]:
    vc = config.vision_config
    merge, patch = vc.spatial_merge_size, vc.patch_size
    if images is not None and grids is not None:
        raise ValueError("give images (sizes) or grids (image_grid_thw rows), not both")
    if images is not None:
        from image_processing_navil import scale_pyramid

        min_pixels = config.min_dynamic_patch * patch**2 if min_pixels is None else min_pixels
        max_pixels = config.max_dynamic_patch * patch**2 if max_pixels is None else max_pixels
        out = []
        for size in images:
            width, height = _image_size(size)
            pyramid = scale_pyramid(
                height, width, min_pixels, max_pixels, config.scale_downsample_ratio, patch, merge, multi_scale
            )
            out.append(_Image([(1, gh, gw) for _, _, gh, gw in pyramid]))
        return out
    if grids is None:
        return []
    rows = grids.tolist() if hasattr(grids, "tolist") else list(grids)
    rows = [tuple(int(v) for v in row) for row in rows]
    for row in rows:
        if len(row) != 3 or min(row) <= 0:
            raise ValueError(f"an image_grid_thw row is (t, h, w) of positive patch counts, got {row}")
        if row[1] % merge or row[2] % merge:
            raise ValueError(f"image grid {row[1]}x{row[2]} patches is not a multiple of the {merge}x{merge} merge")
    if num_scales is None:
        return [_Image([row]) for row in rows]
    counts = num_scales.tolist() if hasattr(num_scales, "tolist") else [int(n) for n in num_scales]
    if sum(counts) != len(rows):
        raise ValueError(f"num_scales {counts} adds up to {sum(counts)} but there are {len(rows)} grid rows")
    out, start = [], 0
    for n in counts:
        out.append(_Image(rows[start : start + n]))
        start += n
    return out


def _image_size(size) -> tuple[int, int]:
    """`(width, height)` from a pair, a `"WxH"` string, or a PIL image."""
    if isinstance(size, str):
        return parse_image_size(size)
    if isinstance(getattr(size, "size", None), tuple):
        size = size.size  # a PIL image: (width, height)
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width, height


def parse_image_size(text: str) -> tuple[int, int]:
    """`"WIDTHxHEIGHT"` (e.g. `1024x768`) -> `(width, height)`."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or not int(match[1]) or not int(match[2]):
        raise ValueError(f"an image size is WIDTHxHEIGHT in pixels, e.g. 1024x768; got {text!r}")
    return int(match[1]), int(match[2])


def _window_lengths(h: int, w: int, window_size: int, merge: int) -> list[int]:
    """Patches in each attention window of an `h x w` scale: windows of `window_size / merge` merge blocks a
    side, edge windows smaller (as `modeling_navil.window_block_order`)."""
    win, mh, mw = window_size // merge, h // merge, w // merge
    rows = [min(win, mh - i) for i in range(0, mh, win)]
    cols = [min(win, mw - j) for j in range(0, mw, win)]
    return [r * c * merge * merge for r in rows for c in cols]


# ---------------------------------------------------------------------------------------------------
# FLOPs


@dataclass
class FlopCount:
    """FLOPs per component (`FLOP_COMPONENTS`) and token type (`TOKEN_TYPES`): `flops[component][type]`;
    `tokens`: the work it counts (`text` / `visual` LLM tokens, `sequence`, ViT `patches`, `merged` tokens,
    `lm_head` positions); `approx[type]`: the 2ND / 6ND estimate; `settings`: the conventions used."""

    flops: dict[str, dict[str, int]]
    tokens: dict[str, int]
    approx: dict[str, int]
    settings: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(row.values()) for row in self.flops.values())

    @property
    def approx_total(self) -> int:
        return sum(self.approx.values())

    def by_component(self) -> dict[str, int]:
        return {c: sum(row.values()) for c, row in self.flops.items()}

    def by_token_type(self) -> dict[str, int]:
        return {t: sum(row[t] for row in self.flops.values()) for t in TOKEN_TYPES}

    def __add__(self, other: FlopCount) -> FlopCount:
        if self.settings != other.settings:
            raise ValueError(
                f"cannot add FLOP counts made with different settings: {self.settings} vs {other.settings}"
            )
        return FlopCount(
            {c: {t: self.flops[c][t] + other.flops[c][t] for t in TOKEN_TYPES} for c in FLOP_COMPONENTS},
            {k: self.tokens[k] + other.tokens[k] for k in self.tokens},
            {t: self.approx[t] + other.approx[t] for t in TOKEN_TYPES},
            dict(self.settings),
        )

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_component": self.by_component(),
            "by_token_type": self.by_token_type(),
            "table": {c: dict(row) for c, row in self.flops.items()},
            "approx": {**self.approx, "total": self.approx_total},
            "tokens": dict(self.tokens),
            "settings": dict(self.settings),
        }


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def count_flops(
    model_or_config,
    images=None,
    text_tokens: int | None = None,
    *,
    grids=None,
    num_scales=None,
    token_types=None,
    training: bool = False,
    attention: bool = True,
    causal: str = "exact",
    lm_head: str | int = "all",
    include_embeddings: bool = True,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    multi_scale: bool = True,
) -> FlopCount:
    """FLOPs of one forward (`training`: forward + backward) of one sequence (docs/research/accounting.md, "FLOP
    conventions").

    Images: `images`, their sizes (`(width, height)` pairs, `"WxH"` strings or PIL images; the processor's
    scale pyramid with the config's image settings, or `min_pixels` / `max_pixels` / `multi_scale`), or
    `grids`, `image_grid_thw` rows `(t, h, w)` taken as they are (`num_scales` groups them into images;
    one image per row without it). `text_tokens`: text tokens besides the images' own. `token_types`: the
    whole LLM sequence's token types in order (1 visual, 0 text; e.g. `mm_token_type_ids[0]`) in place of
    `text_tokens` and the images-first order. `attention=False` leaves the score/value matmuls out."""
    _check_choice("causal", causal, CAUSAL_CONVENTIONS)
    if not isinstance(lm_head, int) or isinstance(lm_head, bool):
        _check_choice("lm_head", lm_head, LM_HEAD_POSITIONS)
    elif lm_head < 0:
        raise ValueError(f"lm_head positions must be >= 0, got {lm_head}")
    config = _config_of(model_or_config)
    vc, tc = config.vision_config, config.text_config
    merge = vc.spatial_merge_size
    images = _image_scales(config, images, grids, num_scales, min_pixels, max_pixels, multi_scale)

    if token_types is not None:
        if text_tokens:
            raise ValueError("give text_tokens or token_types (the whole sequence), not both")
        types = [int(bool(t)) for t in (token_types.tolist() if hasattr(token_types, "tolist") else token_types)]
        expected = sum(image.context_tokens(merge) + 1 for image in images)
        if images and sum(types) != expected:
            raise ValueError(
                f"token_types has {sum(types)} visual tokens but the images give {expected} "
                "(<IMG_CONTEXT> tokens and one <img> per image)"
            )
    else:
        if text_tokens is not None and text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
        types = [t for image in images for t in image.token_types(merge)] + [0] * (text_tokens or 0)
    n = {"visual": sum(types)}
    n["text"] = len(types) - n["visual"]
    if isinstance(lm_head, int) and lm_head > n["text"]:
        raise ValueError(f"lm_head={lm_head} labelled positions but the sequence has {n['text']} text tokens")

    flops = {c: dict.fromkeys(TOKEN_TYPES, 0) for c in FLOP_COMPONENTS}
    # ViT: per patch, the patch embedding and every layer's qkv, proj, fc1, fc2.
    c = vc.hidden_size
    scales = [scale for image in images for scale in image.scales]
    patches = sum(t * h * w for t, h, w in scales)
    patch_embed = 2 * patches * vc.num_channels * vc.patch_size**2 * c
    vision_layers = 2 * patches * vc.num_hidden_layers * (4 * c * c + 2 * c * vc.intermediate_size)
    flops["vision"]["visual"] = patch_embed + vision_layers
    if attention:
        full_pairs = sum(t * (h * w) ** 2 for t, h, w in scales)
        window_pairs = sum(t * sum(k * k for k in _window_lengths(h, w, vc.window_size, merge)) for t, h, w in scales)
        full = vc.fullatt_block_indexes
        n_full = sum(1 for i in range(vc.num_hidden_layers) if full is None or i in full)
        pairs = n_full * full_pairs + (vc.num_hidden_layers - n_full) * window_pairs
        flops["vision_attention"]["visual"] = 4 * c * pairs
    merged = patches // (merge * merge)
    d = tc.hidden_size
    flops["connector"]["visual"] = 2 * merged * (c * merge * merge * d + d * d)

    # LLM: each expert's projections and FFN on its own tokens; the chained visual output runs o_proj too;
    # without experts every token runs the text weights.
    q_dim, kv_dim = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    layers = tc.num_hidden_layers
    per_token = 2 * layers * (d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * tc.intermediate_size)
    flops["text"]["text"] = n["text"] * per_token
    if not has_visual_experts(config):
        flops["text"]["visual"] = n["visual"] * per_token
    elif tc.chain_visual_output:
        flops["visual_experts"]["visual"] = n["visual"] * (per_token - 2 * layers * q_dim * d + 2 * layers * d * d)
        flops["text"]["visual"] = n["visual"] * 2 * layers * q_dim * d  # o_proj, before o_proj_ve
    else:
        flops["visual_experts"]["visual"] = n["visual"] * per_token
    if attention:
        length = len(types)
        for token_type, flag in (("text", 0), ("visual", 1)):
            count = sum(1 for t in types if t == flag)
            if causal == "exact":
                twice_keys = 2 * sum(i + 1 for i, t in enumerate(types) if t == flag)
            elif causal == "half":
                twice_keys = count * length
            else:
                twice_keys = 2 * count * length
            flops["llm_attention"][token_type] = 2 * layers * q_dim * twice_keys  # 4 * keys * q_dim per layer

    # LM head.
    head_positions = dict.fromkeys(TOKEN_TYPES, 0)
    if lm_head == "all":
        head_positions.update(n)
    elif lm_head == "text":
        head_positions["text"] = n["text"]
    elif lm_head == "last" and types:
        head_positions[TOKEN_TYPES[types[-1]]] = 1
    elif isinstance(lm_head, int):
        head_positions["text"] = lm_head
    for token_type in TOKEN_TYPES:
        flops["lm_head"][token_type] = 2 * head_positions[token_type] * d * tc.vocab_size

    if training:  # backward: 2 x forward; the patch embedding has no input gradient to compute
        flops = {comp: {t: 3 * v for t, v in row.items()} for comp, row in flops.items()}
        flops["vision"]["visual"] -= patch_embed

    params = count_parameters(config)
    llm_visual = params.active["visual"]["text"] + params.active["visual"]["visual_experts"]
    approx = {
        "text": params.total["text"] * n["text"] + params.head * head_positions["text"],
        "visual": (params.total["vision"] * patches + params.total["connector"] * merged)
        + llm_visual * n["visual"]
        + params.head * head_positions["visual"],
    }
    if include_embeddings and not params.tied:
        approx["text"] += params.total["embeddings"] * n["text"]
    factor = 6 if training else 2
    approx = {t: factor * v for t, v in approx.items()}

    tokens = {
        "text": n["text"],
        "visual": n["visual"],
        "sequence": len(types),
        "images": len(images),
        "scales": len(scales),
        "patches": patches,
        "merged": merged,
        "lm_head": sum(head_positions.values()),
    }
    settings = {
        "training": training,
        "attention": attention,
        "causal": causal,
        "lm_head": lm_head,
        "include_embeddings": include_embeddings,
    }
    return FlopCount(flops, tokens, approx, settings)


# ---------------------------------------------------------------------------------------------------
# Tables


def human(value: float, unit: str = "") -> str:
    """`1234567` -> `1.235 M` (4 significant digits; k, M, G, T, P, E)."""
    for prefix in ("", "k", "M", "G", "T", "P", "E"):
        if abs(value) < 1000 or prefix == "E":
            break
        value /= 1000
    text = f"{value:.0f}" if not prefix else f"{value:.4g}"
    return f"{text} {prefix}{unit}".rstrip()


def _table(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, None, *rows]:
        if row is None:
            lines.append("  ".join("-" * w for w in widths))
            continue
        cells = [str(row[0]).ljust(widths[0])] + [str(v).rjust(w) for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_parameters(count: ParameterCount) -> str:
    """The parameter table: per component total, trainable, and active per text / visual token."""
    rows = []
    for part in PARTS:
        total = f"{count.total[part]:,}" if not (part == "lm_head" and count.tied) else "tied"
        rows.append((part, total, f"{count.trainable[part]:,}", *(f"{count.active[t][part]:,}" for t in TOKEN_TYPES)))
    rows.append(
        (
            "total",
            f"{count.total_params:,}",
            f"{count.trainable_params:,}",
            *(f"{count.active_params(t):,}" for t in TOKEN_TYPES),
        )
    )
    lines = [
        _table(("component", "parameters", "trainable", "active/text", "active/visual"), rows),
        "",
        f"total {human(count.total_params)}, trainable {human(count.trainable_params)}, "
        f"non-embedding {human(count.non_embedding_params())}",
    ]
    for t in TOKEN_TYPES:
        lines.append(
            f"active per {t} token: {human(count.active_params(t))} "
            f"({human(count.active_params(t, include_embeddings=False))} without embeddings)"
        )
    notes = []
    if count.tied:
        notes.append("the LM head is tied to the embeddings: one tensor, counted under embeddings")
    if not count.visual_experts:
        notes.append("no visual experts: visual tokens use the text weights of the decoder layers")
    elif count.chain_visual_output:
        notes.append("visual tokens' output is o_proj_ve(o_proj(x)): they use the text o_proj too")
    notes.append(
        "a visual token's active parameters include the ViT and connector it comes from"
        + ("" if count.logits_at_visual else "; the LM head counts for text tokens only")
    )
    return "\n".join(lines + [f"note: {n}" for n in notes])


def format_flops(count: FlopCount) -> str:
    """The FLOP table: per component, for text and visual tokens."""
    rows = [
        (comp, *(human(count.flops[comp][t]) for t in TOKEN_TYPES), human(total))
        for comp, total in count.by_component().items()
    ]
    rows.append(("total", *(human(v) for v in count.by_token_type().values()), human(count.total)))
    tk, s = count.tokens, count.settings
    kind = "training step (3x forward)" if s["training"] else "forward"
    head = s["lm_head"] if isinstance(s["lm_head"], str) else f"{s['lm_head']} labelled"
    return "\n".join(
        [
            f"FLOPs of one {kind}: {tk['sequence']:,} LLM tokens ({tk['text']:,} text, {tk['visual']:,} visual), "
            f"{tk['images']} image(s) in {tk['scales']} scale(s): {tk['patches']:,} patches",
            _table(("component", "text tokens", "visual tokens", "total"), rows),
            "",
            f"total {human(count.total, 'FLOP')} ({count.total:,}); "
            f"{'6' if s['training'] else '2'}ND estimate {human(count.approx_total, 'FLOP')} "
            f"({'with' if s['include_embeddings'] else 'without'} embeddings, no attention)",
            f"conventions: 2 FLOPs per multiply-add, matmuls only; causal attention {s['causal']!r}"
            f"{'' if s['attention'] else ' (left out)'}; LM head at {head} positions",
        ]
    )


def summary(model_or_config, images=None, text_tokens=None, *, trainable=None, **flop_options) -> str:
    """The parameter table and, when images, grids, text or token types are given, the FLOP table."""
    config = _config_of(model_or_config)
    source = model_or_config if _is_model(model_or_config) else config
    parts = [format_parameters(count_parameters(source, trainable=trainable))]
    if any(v is not None for v in (images, text_tokens, flop_options.get("grids"), flop_options.get("token_types"))):
        parts.append(format_flops(count_flops(config, images, text_tokens, **flop_options)))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Config files


def load_config(path):
    """The `NaViLConfig` of a folder (its config.json) or of a config.json file; nothing else is read (no
    weights, no code). A converted folder's config (`model_type` `navil`) loads as it is; an original
    OpenGVLab one (`navil_chat`) is mapped as `navil convert` maps it, with placeholder token ids (they
    change no count). `ValueError` names what is wrong."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} is not a config.json file nor a folder with one")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type == "navil":
        from configuration_navil import NaViLConfig

        return NaViLConfig.from_dict(data)
    if model_type == "navil_chat":
        from configuration_navil import SPECIAL_TOKENS
        from navil_hf.conversion.original import convert_config

        placeholder_ids = {t: i for i, t in enumerate((*SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>"))}
        return convert_config(data, placeholder_ids)
    raise ValueError(f"{file} has model_type {model_type!r}: expected 'navil' (a converted folder) or 'navil_chat'")
