"""Padding-free packing: a packed row gives the loss and gradients of the padded batch of the same
samples (fp32, 1e-6 relative), on every text backend, with or without a cache; attention never crosses
a sample boundary; every parameter gets a gradient in every step (batches without images included)."""

import pytest
import torch

from modeling_navil import packed_segments
from navil_hf.training.collate import IGNORE_INDEX, PackedCollator, PaddedCollator

from tiny import IMG_CONTEXT, assert_fp_close, multimodal_inputs, relative_fp_tolerance, tiny_model

PAD = 0


def _sample(grids=None, text=(20, 21, 22, 23), seed=0, answer=(40, 41, 42)):
    """A sample: optional image with `grids` scales, then text; the last tokens are the labelled answer."""
    if grids:
        inputs = multimodal_inputs(grids, text_before=(3, 4), text_after=text, seed=seed)
        ids = inputs["input_ids"][0].tolist()
        sample = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
        sample["num_scales"] = torch.tensor([len(grids)])
    else:
        ids, sample = [3, 4, *text], {}
    ids = ids + list(answer)
    labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + list(answer)
    mm = [int(t in (IMG_CONTEXT, 5)) for t in ids]
    return {
        **sample,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "mm_token_type_ids": torch.tensor(mm),
    }


def _samples():
    return [
        _sample([(4, 4), (8, 8)], seed=1),
        _sample(text=(25, 26), answer=(43, 44, 45, 46, 47)),  # text only
        _sample([(4, 8)], text=(27, 28, 29, 30, 31, 32), seed=2, answer=(48,)),
        _sample([(8, 4)], seed=3, answer=(49, 50)),
    ]


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_same_loss_and_grads(name, loss, grads, ref_loss, ref_grads):
    """Loss and every gradient equal to a few float32 ulps, norm-relative (tiny.relative_fp_tolerance)."""
    tol = relative_fp_tolerance()
    assert grads.keys() == ref_grads.keys()
    worst = max(_relative(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].norm() > 0)
    print(f"{name}: loss {_relative(loss, ref_loss):.3g}, worst gradient {worst:.3g} (relative; tolerance {tol:.3g})")
    assert _relative(loss, ref_loss) <= tol and worst <= tol, worst


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_equals_padded(attn, use_cache):
    model = tiny_model(attn=attn).train()
    samples = _samples()
    packed_loss, packed_grads = _loss_and_grads(model, PackedCollator()(samples), use_cache=use_cache)
    padded_loss, padded_grads = _loss_and_grads(model, PaddedCollator(PAD)(samples), use_cache=use_cache)
    _assert_same_loss_and_grads("packed vs padded", packed_loss, packed_grads, padded_loss, padded_grads)


@pytest.mark.parametrize("packed", [True, False])
def test_labelled_logits_give_the_same_loss_and_gradients(packed):
    """`labelled_logits=True` (what `navil train` collates) runs the LM head on the labelled positions only:
    the loss and every gradient equal those of the full logits (fp32, a few ulps relative)."""
    model = tiny_model().train()
    samples = _samples()
    make = (lambda kept: PackedCollator(labelled_logits=kept)) if packed else (lambda kept: PaddedCollator(PAD, kept))
    kept_batch = make(True)(samples)
    labelled = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)
    assert int((kept_batch["shift_labels"] != IGNORE_INDEX).sum()) == labelled
    kept_loss, kept_grads = _loss_and_grads(model, kept_batch)
    full_loss, full_grads = _loss_and_grads(model, make(False)(samples))
    assert model(**kept_batch).logits.shape[1] == kept_batch["logits_to_keep"].numel() < kept_batch["labels"].shape[1]
    _assert_same_loss_and_grads("labelled vs full logits", kept_loss, kept_grads, full_loss, full_grads)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_training_under_bf16_autocast(attn):
    """`training.bf16` on CPU: Trainer runs the forward under torch.autocast(bfloat16); the packed vision and
    text attention take the kernels' bf16 outputs (it used to fail: fp32 buffer, bf16 pieces), and the loss
    is the fp32 loss to bf16 precision."""
    model = tiny_model(attn=attn).train()
    batch = PackedCollator(labelled_logits=True)(_samples())
    full = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - full.item()) <= 0.05 * full.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_packed_equals_one_at_a_time():
    """Each sample's logits in the packed row equal its logits run alone (attention stays inside it)."""
    model = tiny_model(attn="sdpa")
    samples = _samples()
    with torch.no_grad():
        packed = model(**{k: v for k, v in PackedCollator()(samples).items() if k != "labels"}).logits[0]
        start = 0
        for sample in samples:
            alone = PackedCollator()([sample])
            alone.pop("labels")
            logits = model(**alone).logits[0]
            n = len(sample["input_ids"])
            assert_fp_close(f"packed vs alone (sample at {start})", packed[start : start + n], logits)
            start += n


def test_packing_changes_the_result_when_positions_do_not_restart():
    """The boundaries matter: the same row with running positions (one long sample) differs."""
    model = tiny_model(attn="sdpa")
    batch = PackedCollator()(_samples())
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        running = model(**batch).logits
    assert (packed - running).abs().max() > 1e-3


def test_packed_segments():
    assert packed_segments(torch.arange(6)[None], 1, 6) is None
    segments = packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]), 1, 8)
    assert segments.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert segments.max_seqlen == 3
    two_rows = packed_segments(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]), 2, 4)
    assert two_rows.cu_seqlens.tolist() == [0, 2, 4, 8]


@pytest.mark.parametrize("with_images", [True, False])
def test_every_parameter_gets_a_gradient(with_images):
    """Batches without images (or without visual tokens) still give the vision encoder, the connector and
    the visual experts a gradient (zero), as FSDP/DDP and optimizer-state checkpoints need."""
    model = tiny_model(attn="sdpa").train()
    samples = _samples() if with_images else [_samples()[1]]
    _, grads = _loss_and_grads(model, PackedCollator()(samples))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in grads]
    assert not missing
    if not with_images:
        assert all(grads[n].abs().max() == 0 for n in grads if n.startswith("model.vision_model."))
        assert any(grads[n].abs().max() > 0 for n in grads if n.startswith("model.language_model."))


def test_text_only_loss_unchanged_by_idle_vision():
    """The idle vision pass adds exactly zero: train-mode loss of a text-only batch equals eval mode."""
    model = tiny_model(attn="sdpa")
    batch = PackedCollator()([_samples()[1]])
    with torch.no_grad():
        eval_loss = model(**batch).loss
        train_loss = model.train()(**batch).loss
    assert train_loss.item() == eval_loss.item()
