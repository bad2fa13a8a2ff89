"""Tensor surgery between the original OpenGVLab NaViL layout and ours.

Each function does one reshaping or algebraic step and has an exact inverse where one exists:

* `split_internlm2_wqkv` / `merge_internlm2_wqkv` -- InternLM2's fused `wqkv`, whose rows are grouped
  per KV head (`[num_kv_heads, q_per_kv + 2, head_dim]`), to separate q / k / v and back. Pure
  indexing, so the round trip is bit-exact.
* `fold_chained_projection` -- InternLM2 visual tokens get `wo_ve(wo(x))` (SPEC §8.2); one linear layer
  with weight `W_ve @ W` (and bias `W_ve @ b + b_ve`) computes the same. The product is taken in
  float64 and cast back to the inputs' dtype.
* `unfold_chained_projection` -- a least-squares inverse of the fold (recovers `W_ve` from the folded
  weight and `W`); approximate, so only for writing the original layout back, never for verification.

All functions work on `meta` tensors too, which is how full-size key/shape maps are tested. The dtype
helpers at the end say which dtype a checkpoint is stored in and cast to the one asked for.
"""

import math

import torch

from ..errors import ConversionError


def _check_heads(num_heads, num_kv_heads):
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")


def split_internlm2_wqkv(wqkv, num_heads, num_kv_heads, head_dim):
    """Split a fused InternLM2 `wqkv` weight `[(H + 2*KV) * D, in]` (or bias `[(H + 2*KV) * D]`) into
    q `[H*D, ...]`, k `[KV*D, ...]`, v `[KV*D, ...]`.

    Rows are grouped per KV head: its `q_per_kv` query heads, then its key head, then its value head.
    Query heads come out in head order (kv0's query heads, then kv1's, ...), as grouped-query attention
    expects (query head h uses KV head h // q_per_kv).
    """
    _check_heads(num_heads, num_kv_heads)
    q_per_kv = num_heads // num_kv_heads
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if wqkv.shape[0] != rows:
        raise ValueError(
            f"wqkv has {wqkv.shape[0]} rows, expected (num_heads {num_heads} + 2 * num_kv_heads "
            f"{num_kv_heads}) * head_dim {head_dim} = {rows}"
        )
    rest = tuple(wqkv.shape[1:])
    grouped = wqkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, *rest)  # (KV, G + 2, D, ...)
    q = grouped[:, :q_per_kv].reshape(num_heads * head_dim, *rest)  # (H*D, ...)
    k = grouped[:, q_per_kv].reshape(num_kv_heads * head_dim, *rest)  # (KV*D, ...)
    v = grouped[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, *rest)  # (KV*D, ...)
    return q.clone(), k.clone(), v.clone()


def merge_internlm2_wqkv(q, k, v, num_heads, num_kv_heads, head_dim):
    """Inverse of `split_internlm2_wqkv`: q, k, v (weights or biases) -> fused, KV-head-grouped `wqkv`."""
    _check_heads(num_heads, num_kv_heads)
    q_per_kv = num_heads // num_kv_heads
    rest = tuple(q.shape[1:])
    for name, tensor, heads in (("q", q, num_heads), ("k", k, num_kv_heads), ("v", v, num_kv_heads)):
        if tensor.shape[0] != heads * head_dim or tuple(tensor.shape[1:]) != rest:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected ({heads * head_dim}, {', '.join(map(str, rest))})"
            )
    grouped = torch.cat(
        [
            q.reshape(num_kv_heads, q_per_kv, head_dim, *rest),  # (KV, G, D, ...)
            k.reshape(num_kv_heads, 1, head_dim, *rest),  # (KV, 1, D, ...)
            v.reshape(num_kv_heads, 1, head_dim, *rest),  # (KV, 1, D, ...)
        ],
        dim=1,
    )  # (KV, G + 2, D, ...)
    return grouped.reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


def fold_chained_projection(first_weight, second_weight):
    """Weight of the single linear layer equal to `second(first(x))`: `W2 @ W1` (computed in float64)."""
    if second_weight.shape[1] != first_weight.shape[0]:
        raise ValueError(
            f"cannot chain projections: first is {tuple(first_weight.shape)}, second is {tuple(second_weight.shape)}"
        )
    dtype = torch.promote_types(first_weight.dtype, second_weight.dtype)
    return (second_weight.double() @ first_weight.double()).to(dtype)


def fold_chained_bias(first_bias, second_weight, second_bias=None):
    """Bias of the single linear layer equal to `second(first(x))`: `W2 @ b1 + b2` (in float64)."""
    dtype = torch.promote_types(first_bias.dtype, second_weight.dtype)
    bias = second_weight.double() @ first_bias.double()
    if second_bias is not None:
        bias = bias + second_bias.double()
    return bias.to(dtype)


def unfold_chained_projection(folded_weight, first_weight):
    """Approximate inverse of `fold_chained_projection`: the `W2` with `W2 @ W1 ~= folded` (least squares,
    float64). Exact only up to rounding and only when `W1` has full column rank."""
    # W2 @ W1 = F  <=>  W1^T @ W2^T = F^T
    solution = torch.linalg.lstsq(first_weight.double().T, folded_weight.double().T).solution
    return solution.T.to(folded_weight.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------
# Dtypes of stored tensors


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype_of_headers(weights):
    """A checkpoint's floating dtype: the most common one by element count (float32 if none), from the
    headers of a lazy safetensors mapping (`SafetensorsFolder`) alone."""
    counts = {}
    for key in weights.keys():
        dtype = weights.dtype(key)
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + math.prod(weights.shape(key))
    return max(counts, key=counts.get) if counts else torch.float32


def resolve_dtype(dtype, auto_dtype):
    """A torch dtype as it is, `"auto"` (or `None`) as `auto_dtype` (the source's), otherwise a `DTYPES` name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return auto_dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
