"""NaViL: a native multimodal LLM (OpenGVLab, NeurIPS 2025) as transformers remote code.

Notable features of the architecture, all reproduced here:

* Native-resolution ViT: 16-px patches, no absolute positions, a 2D rotary embedding (row and
  column halves), pre-norm blocks with layer scale. Every image is fed at several scales at once
  ("visual multi-scale packing"); all scales of all images form ONE packed sequence whose segments
  (`cu_seqlens`) are the image scales (full-attention layers) or windows of
  `window_size x window_size` patches (the other layers). No backend ever builds an N x N mask.
* The encoder reorders patches window by window before its first layer and never restores raster
  order, so visual features reach the LLM in window order (SPEC §8.1; checkpoints depend on it).
  New models may set `vision_config.token_order="raster"`: the patches are put back into merge-block
  order after the last layer, so the tokens follow the prompt's rows of `<IMG_CONTEXT>`.
* Connector: 2x2 patch merge -> LayerNorm -> Linear -> GELU -> Linear.
* LLM with modality experts: every layer has separate q/k/v/o projections (+ q/k norms) and FFN
  for visual tokens (`<IMG_CONTEXT>` and `<img>`), routed by token type, no gate. Tokens are
  sorted by modality once per forward; the residual stream stays in that order and is permuted
  only around the (shared, causal) attention, so each expert runs on its own tokens with two
  gathers per layer. A text-only step (decode) runs the plain dense path. With
  `text_config.visual_experts=False` there are no `*_ve` weights: every token takes the text weights
  (early fusion without experts), no sort, no host sync.
* The 12 special tokens take their *prompt* embeddings from a separate table; generated tokens use
  the plain embedding (SPEC §8.3).

Attention backends are functions selected by `attn_implementation` (`eager`, `sdpa`,
`flash_attention_2`); flash-attn is optional and imported inside `try`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

try:  # remote code: a package of sibling files
    from .chat_navil import NaViLChatMixin
    from .compat_navil import CACHE_KWARG, cache_field, create_causal_mask, output_cache, pop_cache, rope_inv_freq
    from .configuration_navil import NaViLConfig, NaViLTextConfig, NaViLVisionConfig
except ImportError:  # the installed top-level modules
    from chat_navil import NaViLChatMixin
    from compat_navil import CACHE_KWARG, cache_field, create_causal_mask, output_cache, pop_cache, rope_inv_freq
    from configuration_navil import NaViLConfig, NaViLTextConfig, NaViLVisionConfig

try:  # optional kernel: only on CUDA machines that built flash-attn
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 -- any import failure means "not available"
    flash_attn_varlen_func = None

try:  # torch's own varlen flash attention (CUDA only), torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # noqa: BLE001
    torch_varlen_attn = None

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class NaViLRMSNorm(nn.Module):
    """RMSNorm computed in float32, weight applied in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _output_flags(config, output_hidden_states, output_attentions, return_dict) -> tuple[bool, bool, bool]:
    """The call's output flags, defaulting to the config's (transformers' convention)."""
    return (
        bool(getattr(config, "output_hidden_states", False) if output_hidden_states is None else output_hidden_states),
        bool(getattr(config, "output_attentions", False) if output_attentions is None else output_attentions),
        bool(getattr(config, "return_dict", True) if return_dict is None else return_dict),
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# --------------------------------------------------------------------------------------------
# Vision encoder: packed segments and their attention kernels
# --------------------------------------------------------------------------------------------


@dataclass
class PackedSegments:
    """Segments of one packed sequence, described for every backend.

    `cu_seqlens` feeds the varlen kernels. `groups` feeds the per-segment sdpa / eager paths:
    segments of equal length are stacked into one batch, `(index [n_segments, length])`, so a
    thousand 64-token windows cost one sdpa call, and no tensor of size tokens^2 is ever built.
    """

    cu_seqlens: torch.Tensor  # int32 [S + 1]
    max_seqlen: int
    groups: list[torch.Tensor]

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, device: torch.device) -> PackedSegments:
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        groups = []
        for length in np.unique(lengths):
            seg_starts = starts[lengths == length]
            index = seg_starts[:, None] + np.arange(length)[None, :]
            groups.append(torch.from_numpy(index).to(device))
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return cls(torch.from_numpy(cu).to(device), int(lengths.max()), groups)

    def is_single(self, total: int) -> bool:
        return len(self.groups) == 1 and self.groups[0].shape[0] == 1 and self.groups[0].shape[1] == total


class _GatherGroups(torch.autograd.Function):
    """`x.index_select(0, index)` for every group's flat index (disjoint; together every row of x). Backward:
    each group's gradient written into ONE buffer. (index_select's own backward allocates a zero tensor of
    x's full size per group and scatters into it, and autograd sums those: O(groups x tokens).)"""

    @staticmethod
    def forward(ctx, x, *indices):
        ctx.save_for_backward(*indices)
        ctx.shape = x.shape
        return tuple(x.index_select(0, index) for index in indices)

    @staticmethod
    def backward(ctx, *grads):
        grad = grads[0].new_zeros(ctx.shape)
        for index, g in zip(ctx.saved_tensors, grads):
            grad.index_copy_(0, index, g)
        return (grad, *(None for _ in grads))


class _ScatterGroups(torch.autograd.Function):
    """The inverse: every group's rows `index_copy_`'d into one new [total, ...] tensor; backward: one gather
    per group. (A chain of autograd `index_copy_` clones and zero-fills the full gradient once per group.)"""

    @staticmethod
    def forward(ctx, total, *pieces_and_indices):
        half = len(pieces_and_indices) // 2
        pieces, indices = pieces_and_indices[:half], pieces_and_indices[half:]
        ctx.save_for_backward(*indices)
        out = pieces[0].new_empty((total, *pieces[0].shape[1:]))
        for index, piece in zip(indices, pieces):
            out.index_copy_(0, index, piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        indices = ctx.saved_tensors
        return (None, *(grad.index_select(0, index) for index in indices), *(None for _ in indices))


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: PackedSegments, scale: float, kernel
) -> torch.Tensor:
    """Runs `kernel(q, k, v, scale)` on [n, H, len, D] batches of equal-length segments. With gradients (and
    not under torch.compile, which traces the plain ops without graph breaks) the gathers into the groups and
    the scatter back are single autograd nodes, so the backward is linear in the tokens whatever the number
    of groups (a packed batch has about one group per sample)."""
    total = query.shape[0]
    if segments.is_single(total):  # one segment: no gather at all
        out = kernel(*(t.transpose(0, 1).unsqueeze(0) for t in (query, key, value)), scale)
        return out.squeeze(0).transpose(0, 1)
    flats = [index.reshape(-1) for index in segments.groups]
    one_node = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if one_node:
        gathered = [_GatherGroups.apply(t, *flats) for t in (query, key, value)]
    else:
        gathered = [[t.index_select(0, flat) for flat in flats] for t in (query, key, value)]
    outs = []
    for index, q, k, v in zip(segments.groups, *gathered):
        q, k, v = (t.unflatten(0, index.shape).transpose(1, 2) for t in (q, k, v))
        outs.append(kernel(q, k, v, scale).transpose(1, 2).flatten(0, 1))
    if one_node:
        return _ScatterGroups.apply(total, *outs, *flats)
    out = outs[0].new_empty((total, *outs[0].shape[1:]))  # the kernel's dtype (autocast may change it)
    for flat, piece in zip(flats, outs):
        out.index_copy_(0, flat, piece)
    return out


def _eager_weights(q, k, scale):  # [n, H, len, D] -> [n, H, len, len]
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    return F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)


def _eager_kernel(q, k, v, scale):  # [n, H, len, D]
    return torch.matmul(_eager_weights(q, k, scale), v)


def _sdpa_kernel(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def vision_eager_attention(query, key, value, segments: PackedSegments, scale: float) -> torch.Tensor:
    """Reference: explicit softmax(q k^T) per segment. q/k/v: [N, H, D] packed."""
    return _grouped_attention(query, key, value, segments, scale, _eager_kernel)


def vision_sdpa_attention(query, key, value, segments: PackedSegments, scale: float) -> torch.Tensor:
    """`scaled_dot_product_attention` per segment (equal-length segments batched)."""
    return _grouped_attention(query, key, value, segments, scale, _sdpa_kernel)


def vision_eager_attention_with_weights(query, key, value, segments: PackedSegments, scale: float):
    """`vision_eager_attention` that also returns the attention weights: one [H, len, len] map per
    segment (image scale or window), in `cu_seqlens` order. Only for `output_attentions`."""
    out = None
    maps = []
    for index in segments.groups:
        flat = index.reshape(-1)
        q, k, v = (t.index_select(0, flat).unflatten(0, index.shape).transpose(1, 2) for t in (query, key, value))
        weights = _eager_weights(q, k, scale)
        piece = torch.matmul(weights, v).transpose(1, 2).flatten(0, 1)
        if out is None:  # the kernel's dtype: under autocast it is not the input's
            out = piece.new_empty(query.shape)
        out.index_copy_(0, flat, piece)
        maps += zip(index[:, 0].tolist(), weights.unbind(0))
    return out, tuple(w for _, w in sorted(maps, key=lambda item: item[0]))


# --------------------------------------------------------------------------------------------
# Attention backends: the one place that decides what runs for `attn_implementation`
# --------------------------------------------------------------------------------------------
#
# `eager` and `sdpa` run what they say in both towers. `flash_attention_2` (or any
# `flash_attention*`) runs flash-attn's varlen kernel when flash-attn is installed; without it the
# name stays selectable (`flash_stand_in`): the vision encoder runs torch's varlen kernel on CUDA
# in half precision (sdpa per segment elsewhere) and the text model runs sdpa (torch's own flash
# kernel on CUDA). Any other registered name (`AttentionInterface`) runs in the text model; the
# vision encoder, which attends packed segments, runs sdpa for it.


def _is_flash(attn_implementation: str | None) -> bool:
    return bool(attn_implementation) and attn_implementation.startswith("flash_attention")


def flash_stand_in(attn_implementation: str | None) -> bool:
    """True when a flash backend is asked for and flash-attn is missing (torch kernels stand in)."""
    return _is_flash(attn_implementation) and flash_attn_varlen_func is None


def flash_stand_in_name(attn_implementation: str | None) -> str | None:
    """transformers refuses a flash backend when flash-attn is missing; ours has stand-ins. For such a
    request, the name the model keeps (`flash_attention_2`; said once in the log), else None."""
    if not flash_stand_in(attn_implementation):
        return None
    logger.warning_once(
        "flash-attn is not installed: `flash_attention_2` runs torch's varlen attention (CUDA) in the "
        "vision encoder and sdpa in the language model."
    )
    return "flash_attention_2"


def flash_varlen_attention(query, key, value, segments: PackedSegments, scale: float, causal=False, dropout=0.0):
    """A flash backend's varlen kernel over packed segments (q/k/v: [T, H or KV, D]): flash-attn's on CUDA
    when installed, else torch's on CUDA in half precision without dropout. None when neither applies:
    the caller runs its per-segment sdpa (or eager) instead. `causal` also lets k/v have fewer heads (GQA)."""
    if not query.is_cuda:
        return None
    cu, m = segments.cu_seqlens, segments.max_seqlen
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(
            query, key, value, cu, cu, m, m, dropout_p=dropout, softmax_scale=scale, causal=causal
        )
    if torch_varlen_attn is not None and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0:
        masking = {"window_size": (-1, 0), "enable_gqa": True} if causal else {}
        return torch_varlen_attn(query, key, value, cu, cu, m, m, scale=scale, **masking)
    return None


def vision_flash_attention(query, key, value, segments: PackedSegments, scale: float) -> torch.Tensor:
    """Varlen flash attention (`flash_varlen_attention`), else sdpa per segment."""
    out = flash_varlen_attention(query, key, value, segments, scale)
    return vision_sdpa_attention(query, key, value, segments, scale) if out is None else out


VISION_ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": vision_eager_attention,
    "sdpa": vision_sdpa_attention,
    "flash_attention_2": vision_flash_attention,
}


def vision_attention_function(attn_implementation: str | None) -> Callable:
    """The packed-segment kernel the vision encoder runs for `attn_implementation`."""
    if attn_implementation is None:
        return vision_sdpa_attention
    if _is_flash(attn_implementation):
        return vision_flash_attention
    if attn_implementation not in VISION_ATTENTION_FUNCTIONS:
        logger.warning_once(
            f"the vision encoder has no {attn_implementation!r} attention; it runs sdpa per segment "
            f"(available: {', '.join(sorted(VISION_ATTENTION_FUNCTIONS))})"
        )
        return vision_sdpa_attention
    return VISION_ATTENTION_FUNCTIONS[attn_implementation]


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: explicit softmax(q k^T) with GQA expansion. q: [B, H, L, D]."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def text_attention_implementation(requested: str | None) -> str:
    """The backend name the text attention really runs (what its masks are built for)."""
    if requested is None or flash_stand_in(requested):
        return "sdpa"
    return requested


def text_attention_function(requested: str | None) -> Callable:
    """The text attention function: ours for `eager`, transformers' registry for the rest."""
    implementation = text_attention_implementation(requested)
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def _causal_sdpa_kernel(q, k, v, scale, dropout=0.0):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, dropout_p=dropout)


def _causal_eager_kernel(q, k, v, scale, dropout=0.0):
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
    weights = F.softmax(weights.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(weights, p=dropout, training=dropout > 0), v)


def text_packed_attention(requested: str | None, query, key, value, segments: PackedSegments, scaling, dropout=0.0):
    """Causal attention inside every segment of packed rows (several samples in one row: training's
    padding-free batches). q: [B, H, L, D], k/v: [B, KV, L, D]; returns [B, L, H, D].

    The segments tile the flattened B * L tokens. flash-attn's (or torch's) varlen kernel runs on CUDA
    for the flash backends; everywhere else sdpa (or, for `eager`, an explicit softmax) runs per segment,
    equal-length segments batched: no mask over the whole row is ever built."""
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))  # [T, H or KV, D]
    implementation = requested or "sdpa"
    if _is_flash(implementation):
        out = flash_varlen_attention(q, k, v, segments, scaling, causal=True, dropout=dropout)
        if out is not None:
            return out.unflatten(0, (batch, length))
    if k.shape[1] != heads:  # GQA: the per-segment kernels take as many k/v heads as q heads
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    kernel = _causal_eager_kernel if implementation == "eager" else _causal_sdpa_kernel
    out = _grouped_attention(q, k, v, segments, scaling, functools.partial(kernel, dropout=dropout))
    return out.unflatten(0, (batch, length))


@torch.compiler.disable
def _all_true(attention_mask) -> bool:
    return torch.is_tensor(attention_mask) and attention_mask.ndim == 2 and bool(attention_mask.all())


@torch.compiler.disable  # host-side, once per forward
def packed_segments(position_ids: torch.Tensor, batch: int, length: int) -> PackedSegments | None:
    """The samples packed in rows, from `position_ids` [B or 1, L]: a sample starts wherever the position
    does not follow the previous one (and at every row's start). None when every row is one sample."""
    positions = position_ids.expand(batch, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    starts = starts.reshape(-1).nonzero().squeeze(-1).cpu().numpy()
    if len(starts) == batch:
        return None
    return PackedSegments.from_lengths(np.diff(np.append(starts, batch * length)), position_ids.device)


class _AttentionConfigView:
    """The text config as the mask helpers should see it (the backend that really runs)."""

    def __init__(self, config, attn_implementation: str):
        self._config = config
        self._attn_implementation = attn_implementation

    def __getattr__(self, name):
        return getattr(self._config, name)


# --------------------------------------------------------------------------------------------
# Vision encoder: layout of the packed sequence (host-side, once per forward)
# --------------------------------------------------------------------------------------------


def merge_block_positions(grid_h: int, grid_w: int, merge: int = 2) -> np.ndarray:
    """(row, col) of every patch in merge-block order (block rows, block cols, 2x2 inside)."""
    rows = np.arange(grid_h).reshape(grid_h // merge, merge, 1, 1)
    cols = np.arange(grid_w).reshape(1, 1, grid_w // merge, merge)
    rows = np.broadcast_to(rows, (grid_h // merge, merge, grid_w // merge, merge)).transpose(0, 2, 1, 3)
    cols = np.broadcast_to(cols, (grid_h // merge, merge, grid_w // merge, merge)).transpose(0, 2, 1, 3)
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def window_block_order(merged_h: int, merged_w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge blocks of a `merged_h x merged_w` grid, window by window (windows row-major, blocks
    row-major inside a window; edge windows smaller). Returns (block order, blocks per window)."""
    pad_h, pad_w = -merged_h % window, -merged_w % window
    ids = np.pad(
        np.arange(merged_h * merged_w).reshape(merged_h, merged_w), ((0, pad_h), (0, pad_w)), constant_values=-1
    )
    n_h, n_w = ids.shape[0] // window, ids.shape[1] // window
    ids = ids.reshape(n_h, window, n_w, window).transpose(0, 2, 1, 3).reshape(n_h * n_w, window * window)
    valid = ids >= 0
    return ids[valid], valid.sum(axis=1)


@dataclass
class VisionLayout:
    """Everything the encoder needs about the packed images, computed once per forward."""

    patch_order: torch.Tensor  # [N] window order of patches (indexes merge-block order)
    positions: torch.Tensor  # [N, 2] (row, col) of every patch, in window order
    full: PackedSegments  # one segment per image scale
    windowed: PackedSegments  # one segment per window
    restore_order: torch.Tensor | None = None  # [N] inverse of patch_order (indexes window order); when asked for


@torch.compiler.disable  # host-side (numpy) by design: one graph break under torch.compile
def vision_layout(
    grid_thw: torch.Tensor | np.ndarray,
    window_size: int,
    merge: int,
    device,
    num_patches: int | None = None,
    restore: bool = False,
) -> VisionLayout:
    """The packed sequence's layout; `num_patches` (the rows of `pixel_values`) is checked against the grid;
    `restore`: also the inverse permutation (`restore_order`, window order -> merge-block order), sent to
    `device` in the same copy as `patch_order`."""
    grids = np.asarray(grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw, dtype=np.int64).reshape(-1, 3)
    if num_patches is not None and int(grids.prod(-1).sum()) != num_patches:
        raise ValueError(
            f"image_grid_thw describes {int(grids.prod(-1).sum())} patches but pixel_values has {num_patches}"
        )
    unit = merge * merge
    window = window_size // merge
    orders, positions, scale_lengths, window_lengths = [], [], [], []
    offset = 0
    for t, h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"image grid {h}x{w} patches is not a multiple of the {merge}x{merge} merge")
        pos = merge_block_positions(h, w, merge)
        blocks, per_window = window_block_order(h // merge, w // merge, window)
        patch = (blocks[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
        for _frame in range(t):
            orders.append(patch + offset)
            positions.append(pos[patch])
            scale_lengths.append(h * w)
            window_lengths.append(per_window * unit)
            offset += h * w
    order = np.concatenate(orders)
    restore_order = None
    if restore:
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        both = torch.from_numpy(np.concatenate([order, inverse])).to(device)
        order, restore_order = both[: order.size], both[order.size :]
    else:
        order = torch.from_numpy(order).to(device)
    return VisionLayout(
        patch_order=order,
        restore_order=restore_order,
        positions=torch.from_numpy(np.concatenate(positions)).to(device),
        full=PackedSegments.from_lengths(np.array(scale_lengths), device),
        windowed=PackedSegments.from_lengths(np.concatenate(window_lengths), device),
    )


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class NaViLPreTrainedModel(PreTrainedModel):
    config_class = NaViLConfig
    config: NaViLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NaViLVisionBlock", "NaViLDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NaViLVisionBlock):
            with torch.no_grad():
                module.ls1.fill_(module.layer_scale_init)
                module.ls2.fill_(module.layer_scale_init)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        stand_in = flash_stand_in_name(attn_implementation)  # "Attention backends" above
        if stand_in is not None:
            return stand_in
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        if flash_stand_in(requested_attention):
            return requested_attention
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


# --------------------------------------------------------------------------------------------
# Vision encoder: modules
# --------------------------------------------------------------------------------------------


class NaViLVisionRotaryEmbedding(nn.Module):
    """2D RoPE: head_dim/2 angles per patch, [row * f, col * f] with f = theta^(-2i / (head_dim/2))."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim = head_dim // 2
        self.theta = theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=positions.device) / self.dim)
        )
        angles = (positions.to(torch.float32)[..., None] * inv_freq).flatten(-2)  # [N, head_dim/2]
        emb = torch.cat((angles, angles), dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; rotation in float32 (as the original), result in x's dtype."""
    xf = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def _vision_norm(config: NaViLVisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return NaViLRMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class NaViLVisionAttention(nn.Module):
    def __init__(self, config: NaViLVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.qk_normalization:  # full-width RMSNorm of q and k (SPEC §8.4)
            self.q_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.k_norm = NaViLRMSNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states,
        rotary: tuple[torch.Tensor, torch.Tensor],
        segments: PackedSegments,
        output_attentions=False,
    ):
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).view(n, 3, -1).unbind(1)  # each [N, C]
        if self.config.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, self.num_heads, self.head_dim) for t in (q, k, v))  # [N, H, D]
        q, k = apply_vision_rotary(q, *rotary), apply_vision_rotary(k, *rotary)
        if output_attentions:
            out, weights = vision_eager_attention_with_weights(q, k, v, segments, self.scale)
        else:
            out, weights = (
                vision_attention_function(self.config._attn_implementation)(q, k, v, segments, self.scale),
                None,
            )
        return self.proj(out.reshape(n, -1)), weights  # [N, C], per-segment maps or None


class NaViLVisionMLP(nn.Module):
    def __init__(self, config: NaViLVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NaViLVisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: NaViLVisionConfig, layer_idx: int):
        super().__init__()
        full = config.fullatt_block_indexes
        self.full_attention = full is None or layer_idx in full
        self.norm1 = _vision_norm(config, config.hidden_size)
        self.attn = NaViLVisionAttention(config)
        self.norm2 = _vision_norm(config, config.hidden_size)
        self.mlp = NaViLVisionMLP(config)
        self.layer_scale_init = config.initializer_factor
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, hidden_states, rotary, layout: VisionLayout, output_attentions=False):
        segments = layout.full if self.full_attention else layout.windowed
        attended, weights = self.attn(self.norm1(hidden_states), rotary, segments, output_attentions)
        hidden_states = hidden_states + self.ls1 * attended
        return hidden_states + self.ls2 * self.mlp(self.norm2(hidden_states)), weights


class NaViLPatchEmbed(nn.Conv2d):
    """`Conv2d(3, C, 16, stride 16)` on [N, 3, 16, 16] patches, computed as the one matrix product it
    is. A module of its own so that hooks (accelerate's offload) see every read of its weight."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, 3, p, p] -> [N, C]
        n = pixel_values.shape[0]
        weight = self.weight
        return F.linear(pixel_values.to(weight.dtype).reshape(n, -1), weight.reshape(weight.shape[0], -1), self.bias)


class NaViLVisionModel(NaViLPreTrainedModel):
    """Native-resolution ViT over one packed sequence of image scales.

    Input `pixel_values` [N, 3, 16, 16] in merge-block order, `grid_thw` [S, 3].
    Output [N, C] in window order (SPEC §8.1), or with `config.token_order="raster"` in the input's
    merge-block order (the connector's tokens then run row by row over the merged grid).
    """

    config_class = NaViLVisionConfig
    config: NaViLVisionConfig

    def __init__(self, config: NaViLVisionConfig):
        super().__init__(config)
        self.config = config
        self.patch_embed = NaViLPatchEmbed(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.rotary = NaViLVisionRotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.layers = nn.ModuleList([NaViLVisionBlock(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self):
        return self.patch_embed

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """`last_hidden_state` [N, C] and `hidden_states` (the patch embeddings and every layer's output,
        [N, C] each) in the output order of `config.token_order`: window order (`"window"`, SPEC §8.1) or the
        merge-block order of `pixel_values` (`"raster"`: row `i` belongs to patch `i` of the input; the
        layers still compute in window order); `attentions`: per layer, one [H, len, len] map per attended
        segment, segments and their rows in window order (eager weights, computed only when asked for)."""
        output_hidden_states, output_attentions, return_dict = _output_flags(
            self.config, output_hidden_states, output_attentions, return_dict
        )
        merge, n = self.config.spatial_merge_size, pixel_values.shape[0]
        raster = self.config.token_order == "raster"
        layout = vision_layout(
            grid_thw, self.config.window_size, merge, pixel_values.device, num_patches=n, restore=raster
        )
        hidden = self.patch_embed(pixel_values)
        hidden = hidden.index_select(0, layout.patch_order)  # window order through the layers
        cos, sin = self.rotary(layout.positions)
        all_hidden = [hidden] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            hidden, weights = layer(hidden, (cos, sin), layout, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden)
            if output_attentions:
                all_attentions.append(weights)
        if raster:  # back to merge-block order: the connector's 2x2 merges then run row by row
            hidden = hidden.index_select(0, layout.restore_order)
            if output_hidden_states:
                all_hidden = [h.index_select(0, layout.restore_order) for h in all_hidden[:-1]] + [hidden]
        output = BaseModelOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class NaViLConnector(nn.Module):
    """2x2 merge (4 consecutive patches -> one token) -> LayerNorm -> Linear -> GELU -> Linear. Tokens come
    out in the order of the encoder's output (`vision_config.token_order`: window or raster order)."""

    def __init__(self, config: NaViLConfig):
        super().__init__()
        merged = config.vision_config.hidden_size * config.vision_config.spatial_merge_size**2
        self.norm = nn.LayerNorm(merged)
        self.linear_1 = nn.Linear(merged, config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        x = vision_features.reshape(-1, self.norm.normalized_shape[0])  # [N/4, 4C]
        return self.linear_2(self.act(self.linear_1(self.norm(x))))


# --------------------------------------------------------------------------------------------
# Language model with modality experts
# --------------------------------------------------------------------------------------------


@torch.compiler.disable  # the one host sync of a routed forward
def _routing_order(visual_mask: torch.Tensor):
    """(visual tokens, text-first stable order, its inverse); no permutation unless both kinds occur."""
    flat = visual_mask.reshape(-1).to(torch.bool)
    num_visual = int(flat.sum())
    if not 0 < num_visual < flat.numel():
        return num_visual, None, None
    order = torch.argsort(flat.to(torch.int8), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(flat.numel(), device=flat.device)
    return num_visual, order, inverse


class ModalityRouting:
    """Sorts the tokens of a forward text-first, visual-last, once; every layer reuses it.

    `to_sorted` / `to_natural` are the only data movements: the residual stream lives in sorted
    order, where `[:n_text]` and `[n_text:]` are plain views for the two experts.
    """

    def __init__(self, visual_mask: torch.Tensor | None, num_tokens: int | None = None, both: bool = False):
        """`visual_mask` [B, L] (True: visual expert); None means every one of `num_tokens` is text,
        known without looking (a decode step: no host sync, nothing for torch.compile to break on).
        `both` (training): both experts run in every forward, an expert without tokens on zero rows, so
        every parameter takes part in every step (its gradient is zero, not missing: what FSDP / DDP and
        optimizer-state checkpoints need)."""
        self.both = both
        if visual_mask is None:
            self.num_tokens, self.num_visual, self.order, self.inverse = num_tokens, 0, None, None
        else:
            self.num_tokens = visual_mask.numel()
            self.num_visual, self.order, self.inverse = _routing_order(visual_mask)
        self.num_text = self.num_tokens - self.num_visual

    @property
    def mixed(self) -> bool:
        return self.order is not None

    @property
    def split(self) -> bool:
        """Each expert runs on its own rows (`[:num_text]`, `[num_text:]`), possibly none."""
        return self.mixed or self.both

    @property
    def all_visual(self) -> bool:
        return self.num_visual == self.num_tokens and self.num_tokens > 0

    def to_sorted(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, ...] -> [B*L, ...] sorted
        x = x.flatten(0, 1)
        return x.index_select(0, self.order) if self.mixed else x

    def to_natural(self, x: torch.Tensor, shape) -> torch.Tensor:  # [B*L, ...] sorted -> [B, L, ...]
        if self.mixed:
            x = x.index_select(0, self.inverse)
        return x.unflatten(0, shape)

    def apply(self, x: torch.Tensor, text_fn: Callable, visual_fn: Callable) -> torch.Tensor:
        """Runs each expert on its own rows of a sorted [T, ...] tensor."""
        if not self.split:
            return visual_fn(x) if self.all_visual else text_fn(x)
        return torch.cat([text_fn(x[: self.num_text]), visual_fn(x[self.num_text :])], dim=0)

    def apply_add(
        self, residual: torch.Tensor, x: torch.Tensor, text_fn: Callable, visual_fn: Callable
    ) -> torch.Tensor:
        """`residual + apply(x, text_fn, visual_fn)`, each expert's rows added in place of the concatenation
        (`out=` has no autograd, so with gradients on it is the plain sum)."""
        if not self.mixed or torch.is_grad_enabled():
            return residual + self.apply(x, text_fn, visual_fn)
        out = torch.empty_like(residual)
        n = self.num_text
        torch.add(residual[:n], text_fn(x[:n]), out=out[:n])
        torch.add(residual[n:], visual_fn(x[n:]), out=out[n:])
        return out

    def apply_to_natural(self, x: torch.Tensor, text_fn: Callable, visual_fn: Callable, shape) -> list[torch.Tensor]:
        """Runs each expert on its rows of a sorted [T, ...] tensor; the experts return tuples of [rows, ...]
        tensors, merged straight into natural order [B, L, ...] (one scatter each, no concatenation)."""
        if not self.mixed:
            if self.both:  # one kind of token: concatenation is the natural order
                return [
                    torch.cat(pair).unflatten(0, shape)
                    for pair in zip(text_fn(x[: self.num_text]), visual_fn(x[self.num_text :]))
                ]
            return [t.unflatten(0, shape) for t in (visual_fn(x) if self.all_visual else text_fn(x))]
        n = self.num_text
        merged = []
        for text, visual in zip(text_fn(x[:n]), visual_fn(x[n:])):
            out = text.new_empty((self.num_tokens, *text.shape[1:]))
            out.index_copy_(0, self.order[:n], text)
            out.index_copy_(0, self.order[n:], visual)
            merged.append(out.unflatten(0, shape))
        return merged


class NaViLMLP(nn.Module):
    def __init__(self, config: NaViLTextConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class NaViLTextAttention(nn.Module):
    """GQA attention with a visual expert of every projection (and of the per-head q/k norms); without
    experts (`config.visual_experts=False`) only the text projections exist and take every token."""

    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        bias, out_bias = config.attention_bias, config.attention_out_bias
        self.q_proj = nn.Linear(h, q_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv_dim, bias=bias)
        self.v_proj = nn.Linear(h, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, h, bias=out_bias)
        self.visual_experts = config.visual_experts
        if self.visual_experts:
            self.q_proj_ve = nn.Linear(h, q_dim, bias=bias)
            self.k_proj_ve = nn.Linear(h, kv_dim, bias=bias)
            self.v_proj_ve = nn.Linear(h, kv_dim, bias=bias)
            # InternLM2's chained visual output o_proj_ve(o_proj(x)) maps hidden -> hidden (SPEC §8.2).
            self.o_proj_ve = nn.Linear(h if config.chain_visual_output else q_dim, h, bias=out_bias)
        if config.qk_norm:
            self.q_norm = NaViLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = NaViLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            if self.visual_experts:
                self.q_norm_ve = NaViLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
                self.k_norm_ve = NaViLRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _text_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        norms = (self.q_norm, self.k_norm) if self.config.qk_norm else None
        return self._qkv(x, self.q_proj, self.k_proj, self.v_proj, norms)

    def _visual_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        norms = (self.q_norm_ve, self.k_norm_ve) if self.config.qk_norm else None
        return self._qkv(x, self.q_proj_ve, self.k_proj_ve, self.v_proj_ve, norms)

    def _qkv(self, x, q_proj, k_proj, v_proj, norms):
        """One expert's q [T, H * D], k and v [T, KV * D] for tokens x [T, h], q/k normed per head."""
        q, k, v = q_proj(x), k_proj(x), v_proj(x)
        if norms is not None:
            q = norms[0](q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = norms[1](k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return q, k, v

    def _visual_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj_ve(self.o_proj(x)) if self.config.chain_visual_output else self.o_proj_ve(x)

    def forward(
        self,
        hidden_sorted: torch.Tensor,  # [B*L, h], routing order
        shape: tuple[int, int],
        routing: ModalityRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Without experts the text model routes every token to text; should a caller's routing still mark
        # visual rows, they take the text weights too (the visual path does not exist).
        visual_qkv, visual_output = (
            (self._visual_qkv, self._visual_output) if self.visual_experts else (self._text_qkv, self.o_proj)
        )
        qkv = routing.apply_to_natural(hidden_sorted, self._text_qkv, visual_qkv, shape)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in qkv)  # [B, H, L, D]

        cos, sin = position_embeddings  # [B, L, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        dropout = self.config.attention_dropout if self.training else 0.0
        segments = kwargs.pop("packed_segments", None)
        if segments is not None:  # samples packed in rows: attention stays inside each
            out, weights = (
                text_packed_attention(self.config._attn_implementation, q, k, v, segments, self.scaling, dropout),
                None,
            )
        else:
            out, weights = text_attention_function(self.config._attn_implementation)(
                self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )  # [B, L, H, D]
        out = routing.to_sorted(out.reshape(*shape, -1))
        return routing.apply(out, self.o_proj, visual_output), weights


class NaViLDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NaViLTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NaViLTextAttention(config, layer_idx)
        self.mlp = NaViLMLP(config)
        self.mlp_ve = NaViLMLP(config) if config.visual_experts else None
        self.input_layernorm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_sorted, shape, routing, position_embeddings, attention_mask, cache=None, **kwargs):
        # Norms act per token, so they run on the sorted stream unchanged.
        residual = hidden_sorted
        hidden, weights = self.self_attn(
            self.input_layernorm(hidden_sorted), shape, routing, position_embeddings, attention_mask, cache, **kwargs
        )
        hidden = residual + hidden
        mlp_ve = self.mlp if self.mlp_ve is None else self.mlp_ve  # no experts: every token takes the text FFN
        return routing.apply_add(hidden, self.post_attention_layernorm(hidden), self.mlp, mlp_ve), weights


class NaViLRotaryEmbedding(nn.Module):
    """1D RoPE of the LLM; every rope type transformers knows (default, linear, llama3, yarn, dynamic
    NTK, longrope...). Positions beyond `max_position_embeddings` are what scaling is for: no limit."""

    def __init__(self, config: NaViLTextConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.dynamic = self.rope_type in ("dynamic", "longrope")
        self._seq_len = None  # of the last forward, for the dynamic types

    @property
    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies the last forward used (computed per forward, never stored: nothing to
        initialise or to move when the model is built on the meta device and loaded)."""
        return rope_inv_freq(self.config, "cpu", self._seq_len)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        seq_len = None
        if self.dynamic:  # the dynamic types follow the length
            seq_len = self._seq_len = int(position_ids.max()) + 1
        inv_freq, scaling = rope_inv_freq(self.config, x.device, seq_len)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


class NaViLTokenEmbedding(nn.Embedding):
    """The token embedding, aware of NaViL's special-token table (SPEC §3, §8.3, §10).

    `embed(ids)` (and calling the module) gives what the model feeds for `ids` as prompt: the 12
    special tokens take their rows of `special_token_embedding`; `plain` marks positions that take
    the plain embedding instead (tokens generated under the prompt-only rule). The table is the
    `NaViLModel`'s own module, referenced here without being registered a second time, so weight
    names and tying are unchanged; it is called as a module, so hooks (offload) see it."""

    def attach_special_table(self, table: nn.Embedding, special_token_ids):
        self.__dict__["_special_table"] = table  # not a submodule: it stays `model.special_token_embedding`
        self.special_token_ids = list(special_token_ids or [])

    def forward(self, input_ids: torch.Tensor, plain: torch.Tensor | bool | None = None) -> torch.Tensor:
        """`plain`: a [B, L] mask of positions that take the plain embedding, True for all, None for none."""
        embeds = super().forward(input_ids)
        table = self.__dict__.get("_special_table")
        if table is None or not getattr(self, "special_token_ids", None) or plain is True:
            return embeds
        table_ids = torch.tensor(self.special_token_ids, device=input_ids.device)
        match = input_ids.unsqueeze(-1) == table_ids  # [..., 12]
        is_special = match.any(-1)
        if plain is not None:
            is_special = is_special & ~plain
        rows = table(match.to(torch.int64).argmax(-1))
        return torch.where(is_special.unsqueeze(-1), rows.to(embeds.dtype), embeds)


class NaViLTextModel(NaViLPreTrainedModel):
    """Decoder stack with modality experts. Takes input embeddings and a visual-token mask (ignored when
    `config.visual_experts` is False: every token is then computed with the text weights)."""

    config_class = NaViLTextConfig
    config: NaViLTextConfig

    def __init__(self, config: NaViLTextConfig):
        super().__init__(config)
        self.config = config
        self.embed_tokens = NaViLTokenEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([NaViLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NaViLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = NaViLRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        visual_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """`visual_mask` [B, L]: True where a token is routed to the visual experts (none when omitted;
        ignored without experts)."""
        cache = pop_cache(kwargs, cache, past_key_values)
        output_hidden_states, output_attentions, return_dict = _output_flags(
            self.config, output_hidden_states, output_attentions, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        if checkpointing and self.training and torch.is_grad_enabled():
            if use_cache or cache is not None:
                logger.warning_once("gradient checkpointing in training runs without a cache (`use_cache=False`)")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        explicit_positions = position_ids is not None
        if position_ids is None:
            if torch.is_tensor(attention_mask) and attention_mask.ndim == 2:
                # Left padding: positions count real tokens only, so a padded row equals its unpadded run.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)

        # Several samples packed in a row (positions restart, nothing padded, no past): attention stays
        # inside each sample, whatever the cache and the backend (`text_packed_attention`).
        segments = None
        if past == 0 and explicit_positions and (attention_mask is None or _all_true(attention_mask)):
            segments = packed_segments(position_ids, batch, length)
        implementation = text_attention_implementation(self.config._attn_implementation)
        if output_attentions and (implementation != "eager" or segments is not None):
            logger.warning_once(
                f"output_attentions needs eager attention on unpacked rows; {implementation!r} returns no attention weights"
            )
        mask = None
        if segments is None:
            mask = create_causal_mask(
                _AttentionConfigView(self.config, implementation), inputs_embeds, attention_mask, cache, position_ids
            )
        else:
            kwargs["packed_segments"] = segments
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        if position_embeddings[0].shape[0] != batch:
            position_embeddings = tuple(t.expand(batch, -1, -1) for t in position_embeddings)

        if self.config.visual_experts:
            routing = ModalityRouting(
                visual_mask, num_tokens=batch * length, both=self.training and torch.is_grad_enabled()
            )
        else:  # no experts: every token is text, known without looking (no sort, no host sync)
            routing = ModalityRouting(None, num_tokens=batch * length, both=False)
        hidden = routing.to_sorted(inputs_embeds)
        all_hidden = [inputs_embeds] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            hidden, weights = layer(hidden, (batch, length), routing, position_embeddings, mask, cache=cache, **kwargs)
            if output_hidden_states and i < len(self.layers) - 1:
                all_hidden.append(routing.to_natural(hidden, (batch, length)))
            if output_attentions:
                all_attentions.append(weights)
        hidden = routing.to_natural(self.norm(hidden), (batch, length))
        if output_hidden_states:
            all_hidden.append(hidden)  # the last entry is the normed output the LM head reads
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **cache_field(cache if use_cache else None),
        )
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------


@dataclass
class NaViLModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus, when the forward had images, `image_outputs` (what
    `get_image_features` returns for them) and `image_hidden_states` [image tokens, hidden] (the connector
    features placed at the `<IMG_CONTEXT>` tokens, in order)."""

    image_outputs: BaseModelOutputWithPooling | None = None
    image_hidden_states: torch.Tensor | None = None


@dataclass
class NaViLCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_outputs` and `image_hidden_states` (see `NaViLModelOutputWithPast`)."""

    image_outputs: BaseModelOutputWithPooling | None = None
    image_hidden_states: torch.Tensor | None = None


@torch.compiler.disable  # host-side
def tokens_per_image(image_grid_thw: torch.Tensor, num_scales, merge: int) -> list[int]:
    """LLM tokens of every image: the sum over its scales (`num_scales` rows of `image_grid_thw` each;
    every row is one image when `num_scales` is None) of t * h * w / merge^2."""
    rows = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
    if num_scales is None:
        return rows
    counts = num_scales.tolist() if torch.is_tensor(num_scales) else list(num_scales)
    if sum(counts) != len(rows):
        raise ValueError(f"num_scales {counts} adds up to {sum(counts)} but image_grid_thw has {len(rows)} rows")
    starts = np.cumsum([0, *counts])
    return [sum(rows[starts[i] : starts[i + 1]]) for i in range(len(counts))]


def _generated_positions(input_ids: torch.Tensor, past_length: int, num_prompt_tokens: int):
    """[B, L] True where a token of this forward lies at or after `num_prompt_tokens` (was generated);
    True when all do (a decode step), None when none do."""
    if past_length >= num_prompt_tokens:
        return True
    if past_length + input_ids.shape[1] <= num_prompt_tokens:
        return None
    position = past_length + torch.arange(input_ids.shape[1], device=input_ids.device)
    return (position >= num_prompt_tokens).expand_as(input_ids)


def _past_length(cache) -> int:
    return cache.get_seq_length() if cache is not None else 0


@torch.compiler.disable  # host-side: one graph break under torch.compile
def _image_token_counts(slots: torch.Tensor, image_grid_thw, num_scales, merge: int, from_ids: bool) -> list[int]:
    """Tokens of every image, checked against the prompt's `<IMG_CONTEXT>` slots."""
    counts = tokens_per_image(image_grid_thw, num_scales, merge)
    num_slots = int(slots.sum())
    if num_slots != sum(counts):
        hint = (
            "build the prompt with the processor from the same images"
            if from_ids
            else "inputs_embeds must come from model.get_input_embeddings()(input_ids)"
        )
        raise ValueError(
            f"the prompt has {num_slots} <IMG_CONTEXT> tokens but the images give {sum(counts)} features; {hint}"
        )
    return counts


class NaViLModel(NaViLPreTrainedModel):
    """Vision encoder + connector + special-token table + language model (no LM head)."""

    def __init__(self, config: NaViLConfig):
        super().__init__(config)
        self.vision_model = NaViLVisionModel(config.vision_config)
        self.connector = NaViLConnector(config)
        self.special_token_embedding = nn.Embedding(12, config.text_config.hidden_size)
        self.language_model = NaViLTextModel(config.text_config)
        self._attach_special_table()
        self.post_init()

    def _attach_special_table(self):
        self.language_model.embed_tokens.attach_special_table(
            self.special_token_embedding, self.config.special_token_ids
        )

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        """Takes `value` itself (the same object comes back from `get_input_embeddings`); a plain
        `nn.Embedding` becomes a `NaViLTokenEmbedding` in place, so the special-token table still applies."""
        if type(value) is nn.Embedding:
            value.__class__ = NaViLTokenEmbedding  # same weights, same object, one more behaviour
        elif not isinstance(value, NaViLTokenEmbedding):
            logger.warning_once(
                f"set_input_embeddings got a {type(value).__name__}: the special-token table is not applied to it"
            )
        self.language_model.embed_tokens = value
        if isinstance(value, NaViLTokenEmbedding):
            self._attach_special_table()

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        num_scales: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        image_token_counts: list[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Images -> LLM-ready features.

        `pixel_values` [N_patches, 3, 16, 16] and `image_grid_thw` [S, 3] as the processor gives them;
        `num_scales` groups the grid rows into images (one row per image when omitted);
        `image_token_counts`: the tokens of every image when already known (`tokens_per_image`).
        Returns `last_hidden_state` [N_patches, C] (the vision encoder's output, in window order, or in the
        merge-block order of `pixel_values` with `vision_config.token_order="raster"`),
        `pooler_output`: one [tokens_i, hidden] tensor of connector features per image, and the vision
        encoder's `hidden_states` / `attentions` when asked for."""
        _, _, return_dict = _output_flags(self.config, None, None, return_dict)
        vision = self.vision_model(
            pixel_values, image_grid_thw, output_hidden_states, output_attentions, return_dict=True
        )
        features = self.connector(vision.last_hidden_state)  # [N_patches / 4, hidden]
        split = image_token_counts
        if split is None:
            split = tokens_per_image(image_grid_thw, num_scales, self.config.vision_config.spatial_merge_size)
        output = BaseModelOutputWithPooling(
            last_hidden_state=vision.last_hidden_state,
            pooler_output=features.split(split),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _idle_vision(self, like: torch.Tensor) -> torch.Tensor:
        """Zero, computed through the vision encoder and connector from one blank image of the smallest
        grid: a training batch without images still gives every vision parameter a (zero) gradient, so
        FSDP / DDP reduce the same parameters on every rank and optimizer states exist for all of them."""
        merge = self.config.vision_config.spatial_merge_size
        patch = self.vision_model.config.patch_size
        pixels = like.new_zeros(
            (merge * merge, self.vision_model.config.num_channels, patch, patch), dtype=self.vision_model.dtype
        )
        grid = torch.tensor([[1, merge, merge]], device=like.device)
        features = self.connector(self.vision_model(pixels, grid, return_dict=True).last_hidden_state)
        return features.sum().to(like.dtype) * 0.0

    def _token_embedding(self, token_id: int, like: torch.Tensor) -> torch.Tensor:
        """What `get_input_embeddings()` gives for one token, as compared against `inputs_embeds`."""
        return self.get_input_embeddings()(torch.tensor([token_id], device=like.device))[0].to(like.dtype)

    def _token_mask(self, token_ids, input_ids, inputs_embeds) -> torch.Tensor:
        """[B, L] True where the token is one of `token_ids`: from `input_ids`, or else recognised in
        `inputs_embeds` by its embedding (as transformers' multimodal models do)."""
        token_ids = [i for i in token_ids if i is not None]
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device))
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for token_id in token_ids:
            mask |= (inputs_embeds == self._token_embedding(token_id, inputs_embeds)).all(-1)
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        num_scales: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_prompt_tokens: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> NaViLModelOutputWithPast | tuple:
        cache = pop_cache(kwargs, cache, past_key_values)
        output_hidden_states, output_attentions, return_dict = _output_flags(
            self.config, output_hidden_states, output_attentions, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        generated = None  # positions generated after the prompt (None: none, True: all)
        if input_ids is not None and num_prompt_tokens is not None:
            generated = _generated_positions(input_ids, _past_length(cache), num_prompt_tokens)
        if inputs_embeds is None:
            plain = None if self.config.special_token_table == "everywhere" else generated
            inputs_embeds = self.language_model.embed_tokens(input_ids, plain=plain)
        if mm_token_type_ids is None and generated is not True and self.config.text_config.visual_experts:
            # Prompt tokens route by type (SPEC §3); generated tokens are text, as in `generate`.
            visual = (self.config.image_token_id, self.config.image_start_token_id)
            mm_token_type_ids = self._token_mask(visual, input_ids, inputs_embeds)
            if generated is not None:
                mm_token_type_ids = mm_token_type_ids & ~generated
        image_outputs = features = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            slots = self._token_mask((self.config.image_token_id,), input_ids, inputs_embeds)
            merge = self.config.vision_config.spatial_merge_size
            counts = _image_token_counts(slots, image_grid_thw, num_scales, merge, input_ids is not None)
            image_outputs = self.get_image_features(
                pixel_values, image_grid_thw, num_scales, output_hidden_states, output_attentions, True, counts
            )
            features = image_outputs.pooler_output
            features = torch.cat(features) if len(features) > 1 else features[0]
            inputs_embeds = inputs_embeds.masked_scatter(slots.unsqueeze(-1), features.to(inputs_embeds.dtype))
        elif self.training and torch.is_grad_enabled():
            inputs_embeds = inputs_embeds + self._idle_vision(inputs_embeds)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            visual_mask=mm_token_type_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            cache=cache,
            **kwargs,
        )
        output = NaViLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            image_hidden_states=features,
            **cache_field(output_cache(outputs)),
        )
        return output if return_dict else output.to_tuple()


class NaViLForConditionalGeneration(NaViLChatMixin, NaViLPreTrainedModel, GenerationMixin):
    """NaViL with its LM head and `generate`; `chat` / `batch_chat` (API.md) come from `NaViLChatMixin`
    (chat_navil.py)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: NaViLConfig):
        super().__init__(config)
        self.model = NaViLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, image_grid_thw, num_scales=None, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, num_scales, **kwargs)

    @property
    def vision_model(self):
        return self.model.vision_model

    @property
    def language_model(self):
        return self.model.language_model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        num_scales: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shift_labels: torch.LongTensor | None = None,
        num_prompt_tokens: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> NaViLCausalLMOutputWithPast | tuple:
        r"""
        num_scales: scales per image (`image_grid_thw` has one row per scale); groups the image outputs.
        mm_token_type_ids: 1 where a token is routed to the visual experts; derived from `input_ids`
            (`<IMG_CONTEXT>`, `<img>`) when omitted.
        shift_labels: the next-token targets of the logits returned (`logits_to_keep`'s positions), used
            as they are instead of shifting `labels` (transformers' convention; training computes logits
            only where a label follows).
        num_prompt_tokens: tokens at positions below this take the special-token table embedding;
            `generate` sets it to the prompt length so generated special tokens use the plain
            embedding, as the original does (`config.special_token_table == "prompt"`). `None`: every
            input token is prompt.
        cache / past_key_values: the KV cache (transformers 5.24 renamed it `cache`; both are accepted).
        """
        _, _, return_dict = _output_flags(self.config, None, None, return_dict)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            num_scales=num_scales,
            mm_token_type_ids=mm_token_type_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_prompt_tokens=num_prompt_tokens,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            cache=pop_cache(kwargs, cache, past_key_values),
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                shift_labels=shift_labels,
                **kwargs,
            )
        output = NaViLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            image_hidden_states=outputs.image_hidden_states,
            **cache_field(output_cache(outputs)),
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        prompt = input_ids if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
        if prompt is not None:
            kwargs.setdefault("num_prompt_tokens", prompt.shape[1])
        return super().generate(input_ids=input_ids, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        prompt_types = kwargs.get("mm_token_type_ids")
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cached = inputs.get(CACHE_KWARG) is not None
        if not kwargs.get("is_first_iteration", False) and cached and kwargs.get("use_cache", True):
            for key in ("pixel_values", "image_grid_thw", "num_scales"):
                inputs.pop(key, None)
        step = inputs.get("input_ids")
        if prompt_types is not None and step is not None:
            step_types = self._step_token_types(prompt_types, input_ids, step.shape[1], kwargs)
            if step_types is None:
                inputs.pop("mm_token_type_ids", None)
            else:
                inputs["mm_token_type_ids"] = step_types
        return inputs

    @staticmethod
    def _step_token_types(prompt_types, input_ids, step_length, kwargs) -> torch.Tensor:
        """`mm_token_type_ids` of the tokens this step feeds (the last `step_length` of `input_ids`):
        the prompt's own types, and text (0) for every generated or candidate token, whatever
        transformers did (or did not do) to extend the prompt's mask."""
        total = input_ids.shape[1]
        prompt_length = kwargs.get("num_prompt_tokens") or prompt_types.shape[1]
        if total - step_length >= prompt_length:
            return None  # all generated: text, known without a mask (no host sync in a decode step)
        prompt_types = prompt_types[:, : min(prompt_length, total)]
        if prompt_types.shape[1] < total:
            pad = prompt_types.new_zeros(prompt_types.shape[0], total - prompt_types.shape[1])
            prompt_types = torch.cat([prompt_types, pad], dim=1)
        return prompt_types[:, total - step_length :]

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """transformers repeats every tensor row-wise; the packed images are not one row per sample:
        each sample's patches, grid rows and scale counts are repeated as a block instead."""
        images = {key: model_kwargs.pop(key, None) for key in ("pixel_values", "image_grid_thw", "num_scales")}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if expand_size > 1 and images["pixel_values"] is not None:
            sample_ids = input_ids[::expand_size] if input_ids is not None and input_ids.numel() else None
            sample_embeds = model_kwargs.get("inputs_embeds")
            sample_embeds = sample_embeds[::expand_size] if sample_embeds is not None else None
            images = self._repeat_images_per_sample(images, sample_ids, sample_embeds, expand_size)
        model_kwargs.update({key: value for key, value in images.items() if value is not None})
        return input_ids, model_kwargs

    def _repeat_images_per_sample(self, images, input_ids, inputs_embeds, times: int) -> dict:
        grid, num_scales = images["image_grid_thw"], images["num_scales"]
        merge = self.config.vision_config.spatial_merge_size
        slots = self.model._token_mask((self.config.image_token_id,), input_ids, inputs_embeds).sum(-1).tolist()
        row_tokens = tokens_per_image(grid, None, merge)  # one row per image: tokens per grid row
        row_patches = grid.prod(-1).tolist()
        scale_counts = num_scales.tolist() if num_scales is not None else [1] * len(row_tokens)
        # Walk the images in order, giving each sample the images whose tokens fill its slots.
        pieces = {"pixel_values": [], "image_grid_thw": [], "num_scales": []}
        row = patch = image = 0
        for sample, wanted in enumerate(slots):
            rows, got = [], 0
            first_image = image
            while got < wanted:
                if image >= len(scale_counts):
                    raise ValueError(f"sample {sample}: the images do not fill its {wanted} <IMG_CONTEXT> tokens")
                rows += range(row, row + scale_counts[image])
                got += sum(row_tokens[r] for r in range(row, row + scale_counts[image]))
                row += scale_counts[image]
                image += 1
            if got != wanted:
                raise ValueError(f"sample {sample} has {wanted} <IMG_CONTEXT> tokens but its images give {got}")
            patches = sum(row_patches[r] for r in rows)
            for _ in range(times):
                pieces["pixel_values"].append(images["pixel_values"][patch : patch + patches])
                pieces["image_grid_thw"].append(grid[row - len(rows) : row])
                if num_scales is not None:
                    pieces["num_scales"].append(num_scales[first_image:image])
            patch += patches
        return {key: torch.cat(value) if value else None for key, value in pieces.items()}


__all__ = [
    "NaViLForConditionalGeneration",
    "NaViLModel",
    "NaViLPreTrainedModel",
    "NaViLTextModel",
    "NaViLVisionModel",
    "VISION_ATTENTION_FUNCTIONS",
]
