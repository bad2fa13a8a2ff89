"""Equivalence tests of the model: backends, routing, cache, batching, save/load, errors."""

import tempfile
import types

import pytest
import torch
import torch.nn.functional as F

import modeling_navil
from modeling_navil import (
    VISION_ATTENTION_FUNCTIONS,
    ModalityRouting,
    NaViLDecoderLayer,
    PackedSegments,
    merge_block_positions,
    vision_layout,
    window_block_order,
)

from tiny import (
    IMG_CONTEXT,
    SPECIAL_IDS,
    assert_fp_close,
    multimodal_inputs,
    tiny_config,
    tiny_model,
    write_hub_folder,
)

GRIDS = [(4, 4), (6, 8), (10, 6)]  # three scales; window 4 splits the larger ones into edge windows


def _report(name, a, b):
    diff = (a - b).abs()
    print(f"{name}: max {diff.max().item():.3g} mean {diff.mean().item():.3g}")
    return diff.max().item()


# ------------------------------------------------------------------------------ vision layout


def test_merge_block_positions_order():
    pos = merge_block_positions(4, 6)
    # first merge block: (0,0) (0,1) (1,0) (1,1); then the block to its right
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert sorted(map(tuple, pos.tolist())) == [(r, c) for r in range(4) for c in range(6)]


def test_window_block_order_edge_windows():
    # 5x3 merged grid, windows of 2x2 blocks: windows row-major, blocks row-major inside.
    order, per_window = window_block_order(5, 3, 2)
    assert per_window.tolist() == [4, 2, 4, 2, 2, 1]
    assert order.tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 9, 10, 8, 11, 12, 13, 14]


def test_vision_layout_segments():
    layout = vision_layout(torch.tensor([[1, 4, 4], [1, 10, 6]]), window_size=4, merge=2, device="cpu")
    assert layout.full.cu_seqlens.tolist() == [0, 16, 76]
    # 4x4 patches = one 2x2-block window; 10x6 patches -> 5x3 blocks -> windows of 4,2,4,2,2,1 blocks
    windows = torch.diff(layout.windowed.cu_seqlens).tolist()
    assert windows == [16, 16, 8, 16, 8, 8, 4]
    assert sorted(layout.patch_order.tolist()) == list(range(76))


# ------------------------------------------------------------------------------ vision attention


def _block_diagonal_reference(q, k, v, cu, scale):
    """Straightforward reference: a dense block-diagonal mask over the packed sequence."""
    n = q.shape[0]
    seg = torch.zeros(n, dtype=torch.long)
    for i in range(len(cu) - 1):
        seg[cu[i] : cu[i + 1]] = i
    mask = seg[:, None] == seg[None, :]
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", sorted(VISION_ATTENTION_FUNCTIONS))
def test_vision_attention_backends_match_reference(backend):
    torch.manual_seed(0)
    lengths = [16, 64, 64, 16, 48, 64, 4]
    n, h, d = sum(lengths), 4, 8
    q, k, v = (torch.randn(n, h, d) for _ in range(3))
    segments = PackedSegments.from_lengths(torch.tensor(lengths).numpy(), "cpu")
    ref = _block_diagonal_reference(q, k, v, segments.cu_seqlens.tolist(), d**-0.5)
    out = VISION_ATTENTION_FUNCTIONS[backend](q, k, v, segments, d**-0.5)
    assert_fp_close(f"vision {backend} vs block-diagonal", out, ref)


def test_flash_fallback_is_decided_in_one_place(monkeypatch):
    """Both towers ask `flash_varlen_attention` for the flash kernel and run their per-segment sdpa when it
    has none (here: CPU); the stand-in name comes from the same section."""
    torch.manual_seed(0)
    lengths = [16, 48, 4]
    n, h, d = sum(lengths), 4, 8
    segments = PackedSegments.from_lengths(torch.tensor(lengths).numpy(), "cpu")
    q, k, v = (torch.randn(n, h, d) for _ in range(3))
    asked = []
    real = modeling_navil.flash_varlen_attention

    def spy(*args, **kwargs):
        asked.append(kwargs.get("causal", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_navil, "flash_varlen_attention", spy)
    vision = modeling_navil.vision_attention_function("flash_attention_2")(q, k, v, segments, d**-0.5)
    assert torch.equal(vision, modeling_navil.vision_sdpa_attention(q, k, v, segments, d**-0.5))
    rows = [t.unflatten(0, (1, n)).transpose(1, 2) for t in (q, k, v)]  # [B, H, L, D]
    text = modeling_navil.text_packed_attention("flash_attention_2", *rows, segments, d**-0.5)
    assert torch.equal(text, modeling_navil.text_packed_attention("sdpa", *rows, segments, d**-0.5))
    assert asked == [False, True]
    monkeypatch.setattr(modeling_navil, "flash_attn_varlen_func", None)
    assert modeling_navil.flash_stand_in_name("flash_attention_3") == "flash_attention_2"
    assert modeling_navil.flash_stand_in_name("sdpa") is None
    monkeypatch.setattr(modeling_navil, "flash_attn_varlen_func", lambda *args, **kwargs: None)
    assert modeling_navil.flash_stand_in_name("flash_attention_2") is None  # flash-attn there: transformers decides


def test_flash_varlen_kernels_get_each_towers_arguments(monkeypatch):
    """What `flash_varlen_attention` hands each CUDA kernel (the kernels stubbed: this runs on CPU): flash-attn
    when installed (causal and dropout as asked), else torch's varlen kernel in half precision without dropout
    (causal: the lower-left window and GQA), else nothing."""
    segments = PackedSegments.from_lengths(torch.tensor([3, 5]).numpy(), "cpu")
    cu, m = segments.cu_seqlens, segments.max_seqlen
    calls = []
    monkeypatch.setattr(modeling_navil, "flash_attn_varlen_func", lambda *args, **kw: calls.append((args, kw)) or "fa")
    monkeypatch.setattr(modeling_navil, "torch_varlen_attn", lambda *args, **kw: calls.append((args, kw)) or "torch")
    cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert modeling_navil.flash_varlen_attention(cuda, "k", "v", segments, 0.5) == "fa"
    assert modeling_navil.flash_varlen_attention(cuda, "k", "v", segments, 0.5, causal=True, dropout=0.1) == "fa"
    monkeypatch.setattr(modeling_navil, "flash_attn_varlen_func", None)
    assert modeling_navil.flash_varlen_attention(cuda, "k", "v", segments, 0.5) == "torch"
    assert modeling_navil.flash_varlen_attention(cuda, "k", "v", segments, 0.5, causal=True) == "torch"
    assert modeling_navil.flash_varlen_attention(cuda, "k", "v", segments, 0.5, causal=True, dropout=0.1) is None
    assert modeling_navil.flash_varlen_attention(types.SimpleNamespace(is_cuda=True, dtype=torch.float32), "k", "v",
                                                 segments, 0.5) is None  # fmt: skip
    assert modeling_navil.flash_varlen_attention(types.SimpleNamespace(is_cuda=False), "k", "v", segments, 0.5) is None
    for args, _ in calls:  # packed q/k/v, then the segments' offsets and longest length for queries and keys
        assert args[:3] == (cuda, "k", "v") and args[3] is cu and args[4] is cu and args[5:] == (m, m)
    assert [kw for _, kw in calls] == [
        {"dropout_p": 0.0, "softmax_scale": 0.5, "causal": False},
        {"dropout_p": 0.1, "softmax_scale": 0.5, "causal": True},
        {"scale": 0.5},
        {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True},
    ]


def test_vision_sdpa_never_builds_a_full_mask(monkeypatch):
    """Every sdpa call sees at most one segment's keys: nothing of size patches^2."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        assert "attn_mask" not in kwargs or kwargs["attn_mask"] is None
        seen.append(k.shape[-2])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(modeling_navil.F, "scaled_dot_product_attention", spy)
    model = tiny_model(attn="sdpa")
    inputs = multimodal_inputs(GRIDS)
    with torch.no_grad():
        model.model.vision_model(inputs["pixel_values"], inputs["image_grid_thw"])
    assert seen and max(seen) <= max(h * w for h, w in GRIDS) < inputs["pixel_values"].shape[0]


# ------------------------------------------------------------------------------ backends end to end


@pytest.mark.parametrize("qk_norm", [True, False])
def test_backends_agree_on_full_model(qk_norm):
    inputs = multimodal_inputs(GRIDS)
    logits = {}
    for attn in ("eager", "sdpa", "flash_attention_2"):  # flash falls back to sdpa without flash-attn/CUDA
        model = tiny_model(attn=attn, qk_norm=qk_norm)
        with torch.no_grad():
            logits[attn] = model(**inputs).logits
    for attn in ("sdpa", "flash_attention_2"):
        assert_fp_close(f"logits {attn} vs eager", logits[attn], logits["eager"])


def test_vision_variants_run_and_differ():
    """qk_normalization (the intended full-width norm) and layer_norm pre-norms both run."""
    inputs = multimodal_inputs(GRIDS)
    outs = []
    for kwargs in ({}, {"qk_normalization": True}, {"norm_type": "layer_norm"}, {"fullatt": None}):
        model = tiny_model(**kwargs)
        with torch.no_grad():
            out = model.model.vision_model(inputs["pixel_values"], inputs["image_grid_thw"]).last_hidden_state
        assert torch.isfinite(out).all()
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[3])


# ------------------------------------------------------------------------------ routing


def _masked_reference_layer(layer, hidden, visual, position_embeddings):
    """Both experts on every token, then select by mask: the straightforward reference."""
    attn = layer.self_attn
    b, l, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    pick = lambda t, v: torch.where(visual[..., None], v, t)  # noqa: E731
    qkv = [pick(t, v) for t, v in zip(attn._text_qkv(x), attn._visual_qkv(x))]
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2) for t in qkv)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    q = q * cos + modeling_navil.rotate_half(q) * sin
    k = k * cos + modeling_navil.rotate_half(k) * sin
    causal = torch.full((l, l), float("-inf")).triu(1)
    out, _ = modeling_navil.eager_attention_forward(attn, q, k, v, causal, attn.scaling)
    out = out.reshape(b, l, -1)
    visual_out = attn.o_proj_ve(attn.o_proj(out)) if attn.config.chain_visual_output else attn.o_proj_ve(out)
    hidden = hidden + pick(attn.o_proj(out), visual_out)
    x = layer.post_attention_layernorm(hidden)
    return hidden + pick(layer.mlp(x), layer.mlp_ve(x))


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_routed_layer_matches_masked_reference(share, chain):
    torch.manual_seed(1)
    config = tiny_config(chain_visual_output=chain).text_config
    config._attn_implementation = "eager"
    layer = NaViLDecoderLayer(config, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    b, l = 2, 24
    hidden = torch.randn(b, l, config.hidden_size)
    visual = torch.rand(b, l) < share
    positions = torch.arange(l)[None].expand(b, l)
    rope = modeling_navil.NaViLRotaryEmbedding(config)(hidden, positions)
    routing = ModalityRouting(visual)
    assert routing.mixed == (0 < visual.sum() < b * l)
    causal = torch.full((l, l), float("-inf")).triu(1)
    with torch.no_grad():
        out, _ = layer(routing.to_sorted(hidden), (b, l), routing, rope, causal)
        out = routing.to_natural(out, (b, l))
        ref = _masked_reference_layer(layer, hidden, visual, rope)
    assert_fp_close(f"routed vs masked (share {share}, chain {chain})", out, ref)


def test_text_only_step_takes_the_dense_path(monkeypatch):
    """A decode step (no visual token) does no gathers at all."""
    calls = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    routing = ModalityRouting(torch.zeros(1, 5, dtype=torch.long))
    x = torch.randn(1, 5, 8)
    assert not routing.mixed and torch.equal(routing.to_natural(routing.to_sorted(x), (1, 5)), x)
    assert calls == []


# ------------------------------------------------------------------------------ special tokens, cache


def test_special_table_applies_to_prompt_positions_only():
    model = tiny_model()
    ids = torch.tensor([[20, SPECIAL_IDS[0], 21, SPECIAL_IDS[8]]])
    embed = model.get_input_embeddings()
    plain = torch.nn.Embedding.forward(embed, ids)
    table = model.model.special_token_embedding.weight
    full = embed(ids)  # what get_input_embeddings() gives is the prompt embedding
    assert torch.equal(full[0, 1], table[0]) and torch.equal(full[0, 3], table[8])
    assert torch.equal(full[0, 0], plain[0, 0])
    # Tokens past the prompt (generated) keep the plain embedding, with or without a cache.
    part = embed(ids, plain=modeling_navil._generated_positions(ids, 0, num_prompt_tokens=2))
    assert torch.equal(part[0, 1], table[0]) and torch.equal(part[0, 3], plain[0, 3])
    step = embed(ids[:, 3:], plain=modeling_navil._generated_positions(ids[:, 3:], 3, num_prompt_tokens=3))
    assert torch.equal(step[0, 0], plain[0, 3])


def test_special_token_table_setting_is_validated():
    with pytest.raises(ValueError, match="special_token_table must be 'prompt' or 'everywhere'"):
        tiny_config(special_token_table="sometimes")


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_cache_equals_no_cache_exactly(with_image):
    model = tiny_model(seed=3)
    inputs = multimodal_inputs(GRIDS) if with_image else {"input_ids": torch.tensor([[20, 21, 22, 23, 24]])}
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_generated_special_token_uses_plain_embedding():
    """Greedy generation where a special token is generated equals a manual loop that embeds
    generated tokens plainly, with and without the cache (SPEC §8.3)."""
    model = tiny_model(seed=4)
    box = SPECIAL_IDS[1]
    with torch.no_grad():  # make <box> the argmax of every step
        model.lm_head.weight[box] = model.model.language_model.norm.weight * 50
    prompt = torch.tensor([[20, 21, 22]])
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        assert cached[0, 3].item() == box
        ids = prompt
        for _ in range(4):
            logits = model(input_ids=ids, num_prompt_tokens=prompt.shape[1]).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        # the step logits really depend on the choice of embedding: the table one differs
        plain = model(input_ids=ids[:, :5], num_prompt_tokens=3).logits[0, -1]
        table = model(input_ids=ids[:, :5]).logits[0, -1]
    assert torch.equal(cached, ids) and torch.equal(uncached, ids)
    assert not torch.allclose(plain, table)


# ------------------------------------------------------------------------------ batching


def test_left_padded_batch_equals_single_runs():
    model = tiny_model(seed=5, attn="sdpa")
    a = multimodal_inputs([(4, 4), (6, 4)], seed=1)
    b = multimodal_inputs([(4, 6)], text_before=(40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51), seed=2)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    length = max(la, lb)

    def pad(t, value):
        return F.pad(t, (length - t.shape[1], 0), value=value)

    batch = dict(
        input_ids=torch.cat([pad(a["input_ids"], 0), pad(b["input_ids"], 0)]),
        attention_mask=torch.cat(
            [pad(torch.ones(1, la, dtype=torch.long), 0), pad(torch.ones(1, lb, dtype=torch.long), 0)]
        ),
        mm_token_type_ids=torch.cat([pad(a["mm_token_type_ids"], 0), pad(b["mm_token_type_ids"], 0)]),
        pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
        image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
    )
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(**batch).logits
        single_a, single_b = model(**a).logits, model(**b).logits
        assert_fp_close("batched vs single (a)", logits[0, length - la :], single_a[0])
        assert_fp_close("batched vs single (b)", logits[1, length - lb :], single_b[0])
        out = model.generate(**batch, **kwargs)
        assert torch.equal(out[0, length:], model.generate(**a, **kwargs)[0, la:])
        assert torch.equal(out[1, length:], model.generate(**b, **kwargs)[0, lb:])


# ------------------------------------------------------------------------------ save / load, training


def test_save_and_auto_load_give_same_logits():
    from transformers import AutoModel

    model = tiny_model(seed=6)
    inputs = multimodal_inputs(GRIDS)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        write_hub_folder(model, tmp)
        loaded = AutoModel.from_pretrained(tmp, trust_remote_code=True, attn_implementation="eager").eval()
        assert type(loaded).__name__ == "NaViLForConditionalGeneration"
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_gradient_checkpointing_changes_nothing():
    model = tiny_model(seed=7)
    inputs = multimodal_inputs(GRIDS)
    labels = inputs["input_ids"].clone()
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    layers = [*model.model.vision_model.layers, *model.model.language_model.layers]
    assert all(layer.gradient_checkpointing for layer in layers)
    loss_ckpt = model(**inputs, labels=labels).loss
    loss_ckpt.backward()
    assert torch.allclose(loss, loss_ckpt)
    assert "model.vision_model.layers.0.attn.qkv.weight" in grads
    assert "model.language_model.layers.0.self_attn.q_proj_ve.weight" in grads
    for n, p in model.named_parameters():
        if n in grads:
            assert_fp_close(f"checkpointed gradient of {n}", p.grad, grads[n])


# ------------------------------------------------------------------------------ errors


def test_image_token_count_mismatch_is_an_error():
    model = tiny_model()
    inputs = multimodal_inputs(GRIDS)
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, inputs["input_ids"][0].tolist().index(IMG_CONTEXT)] = 20
    with pytest.raises(ValueError, match="<IMG_CONTEXT> tokens but the images give"):
        model(**inputs)


def test_grid_and_pixels_mismatch_is_an_error():
    model = tiny_model()
    inputs = multimodal_inputs(GRIDS)
    inputs["pixel_values"] = inputs["pixel_values"][:-4]
    with pytest.raises(ValueError, match="image_grid_thw describes"):
        model(**inputs)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_rope_scaling_runs_beyond_max_position_embeddings(rope_type):
    """Scaling is for positions past the trained context: nothing blocks them, and dynamic NTK is applied
    (unchanged within the context, a stretched base beyond it)."""
    scaling = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    if rope_type == "yarn":
        scaling["original_max_position_embeddings"] = 16
    ids = torch.arange(20, 60)[None]  # 40 tokens, context 16
    model = tiny_model(max_position_embeddings=16, rope_parameters=scaling)
    default = tiny_model(max_position_embeddings=16)
    with torch.no_grad():
        long = model(input_ids=ids).logits
        assert torch.isfinite(long).all()
        if rope_type == "dynamic":
            short = ids[:, :12]
            assert torch.equal(model(input_ids=short).logits, default(input_ids=short).logits)
            assert (long - default(input_ids=ids).logits).abs().max() > 1e-3


def test_bfloat16_forward_tracks_float32():
    model = tiny_model(seed=8, attn="sdpa")
    inputs = multimodal_inputs(GRIDS)
    with torch.no_grad():
        reference = model(**inputs).logits
        low = model.to(torch.bfloat16)(**inputs).logits.float()
    assert torch.isfinite(low).all()
    assert _report("bf16 vs fp32 logits", low, reference) <= 0.05 * reference.abs().max().item() + 0.05
