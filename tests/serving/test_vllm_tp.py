"""The tensor-parallel plan of navil_hf/vllm on CPU, without a GPU or a process group: each decoder layer is
built as rank 0 and as rank 1 of a (faked) tensor-parallel world of 2, loaded from full-size weights through
the layers' own weight loaders (as `load_weights` does), and the shards are checked against the full weights:
q/k/v and gate/up split by output rows per head / half, o_proj, o_proj_ve (chained: hidden -> hidden, split by
input columns too) and down_proj split by input columns. The shards of the two ranks then compute the full
layer's projections: concatenated column shards and summed row-parallel partial products equal the
unsharded results."""

import pytest

pytest.importorskip("vllm")

import torch
from torch import nn

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER = 4, 2, 64, 128, 192


class _NoAttention(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


class _NoRope(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


def _layer(monkeypatch, rank, chain, qk_norm):
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    import navil_hf.vllm.model as navil
    from configuration_navil import NaViLTextConfig

    for module in (linear, parameter, navil):  # every module that asks for the rank or the world size
        if hasattr(module, "get_tensor_model_parallel_rank"):
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(navil, "Attention", _NoAttention)
    monkeypatch.setattr(navil, "get_rope", _NoRope)
    config = NaViLTextConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, qk_norm=qk_norm, chain_visual_output=chain,
    )  # fmt: skip
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        return navil.NaViLDecoderLayer(config, prefix="language_model.layers.0")


def _full_weights(chain, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {}
    for s in ("", "_ve"):
        shapes.update({f"self_attn.q_proj{s}": (q_dim, HIDDEN), f"self_attn.k_proj{s}": (kv_dim, HIDDEN)})
        shapes.update({f"self_attn.v_proj{s}": (kv_dim, HIDDEN)})
    shapes["self_attn.o_proj"] = (HIDDEN, q_dim)
    shapes["self_attn.o_proj_ve"] = (HIDDEN, HIDDEN if chain else q_dim)
    for m in ("mlp", "mlp_ve"):
        shapes.update(
            {f"{m}.gate_proj": (INTER, HIDDEN), f"{m}.up_proj": (INTER, HIDDEN), f"{m}.down_proj": (HIDDEN, INTER)}
        )
    return {name: 0.05 * torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _load(layer, weights):
    from navil_hf.vllm.model import _STACKED

    params = dict(layer.named_parameters())
    for name, tensor in weights.items():
        name = f".{name}.weight"
        for ours, fused, shard in _STACKED:
            if ours in name:
                param = params[name.replace(ours, fused)[1:]]
                param.weight_loader(param, tensor, shard)
                break
        else:
            param = params[name[1:]]
            param.weight_loader(param, tensor)


@pytest.mark.parametrize("chain,qk_norm", [(False, True), (True, False)], ids=["qwen3", "internlm2"])
def test_tensor_parallel_shards(monkeypatch, chain, qk_norm):
    weights = _full_weights(chain)
    layers = []
    for rank in (0, 1):
        layer = _layer(monkeypatch, rank, chain, qk_norm)
        _load(layer, weights)
        layers.append(layer)
    q_half, kv_half, i_half = HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2, INTER // 2
    x = torch.randn(5, HIDDEN)
    for s, mlp in (("", "mlp"), ("_ve", "mlp_ve")):
        q, k, v = (weights[f"self_attn.{p}_proj{s}"] for p in "qkv")
        for rank, layer in enumerate(layers):
            attn = layer.self_attn
            qkv = getattr(attn, f"qkv_proj{s}").weight
            assert qkv.shape == (q_half + 2 * kv_half, HIDDEN)
            rows = slice(rank * q_half, (rank + 1) * q_half), slice(rank * kv_half, (rank + 1) * kv_half)
            assert torch.equal(qkv, torch.cat([q[rows[0]], k[rows[1]], v[rows[1]]]))
            gate_up = getattr(layer, mlp).gate_up_proj.weight
            half = slice(rank * i_half, (rank + 1) * i_half)
            assert gate_up.shape == (2 * i_half, HIDDEN)
            assert torch.equal(gate_up, torch.cat([weights[f"{mlp}.gate_proj"][half], weights[f"{mlp}.up_proj"][half]]))
            down = getattr(layer, mlp).down_proj.weight
            assert torch.equal(down, weights[f"{mlp}.down_proj"][:, half])
        # The two ranks' FFN shards compute the full FFN: column shards, then summed row-parallel partials.
        full = (
            weights[f"{mlp}.down_proj"]
            @ (torch.nn.functional.silu(x @ weights[f"{mlp}.gate_proj"].T) * (x @ weights[f"{mlp}.up_proj"].T)).T
        )
        parts = []
        for layer in layers:
            gu = x @ getattr(layer, mlp).gate_up_proj.weight.T
            gate, up = gu.chunk(2, dim=-1)
            parts.append((torch.nn.functional.silu(gate) * up) @ getattr(layer, mlp).down_proj.weight.T)
        torch.testing.assert_close(sum(parts), full.T, rtol=1e-5, atol=1e-4)
    for rank, layer in enumerate(layers):
        attn = layer.self_attn
        assert torch.equal(attn.o_proj.weight, weights["self_attn.o_proj"][:, rank * q_half : (rank + 1) * q_half])
        cols = HIDDEN // 2 if chain else q_half
        assert torch.equal(attn.o_proj_ve.weight, weights["self_attn.o_proj_ve"][:, rank * cols : (rank + 1) * cols])
        assert attn.num_heads == HEADS // 2 and attn.num_kv_heads == KV_HEADS // 2
        if qk_norm:
            assert attn.q_norm.weight.shape == (HEAD_DIM,) and attn.k_norm_ve.weight.shape == (HEAD_DIM,)
