"""Batches for training: padding-free packing (the default) and the padded batches it replaces.

A sample is what `data.SampleEncoder` returns: `input_ids`, `labels` and `mm_token_type_ids` ([L] each)
and, when it has images, `pixel_values` [patches, 3, 16, 16], `image_grid_thw` [scales, 3] and
`num_scales` [images].

`PackedCollator` concatenates the samples of a batch into ONE row: `position_ids` restart at 0 at
every sample, which is how the model finds the samples (`modeling_navil.packed_segments`) and keeps
attention inside each of them on every backend (varlen kernels on CUDA, sdpa per sample elsewhere);
no padding and no attention mask. Images are packed the way the vision encoder always packs them:
their patches concatenated, one `image_grid_thw` row per scale, `num_scales` grouping the rows into
images, in the order of their `<IMG_CONTEXT>` slots. The first label of every sample is ignored (-100),
so no token learns to predict the next sample; the loss is the mean over the batch's labelled tokens,
exactly as in the padded batch of the same samples.

`labelled_logits=True` (what `navil train` uses) adds `logits_to_keep`, the positions whose next token is
labelled in some row, and `shift_labels`, those next tokens: the model runs its LM head (and the loss) on
those positions only, the same loss and gradients without a [tokens, vocab] logits tensor for the prompt
(with answers a few tokens long and a 49k-152k vocabulary, most of the head's time and memory).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "labels", "mm_token_type_ids")
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "num_scales")


def _check(samples):
    if not samples:
        raise ValueError("cannot collate an empty batch")
    for i, sample in enumerate(samples):
        missing = [key for key in TEXT_KEYS if key not in sample]
        if missing:
            raise ValueError(f"sample {i} of the batch has no {', '.join(missing)}")
        lengths = {key: len(sample[key]) for key in TEXT_KEYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"sample {i} of the batch has text fields of different lengths: {lengths}")


def _as_long(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.long)


def _labels(sample) -> torch.Tensor:
    labels = _as_long(sample["labels"]).clone()
    labels[:1] = IGNORE_INDEX  # never predicted from the previous sample
    return labels


def keep_labelled_logits(batch: dict) -> dict:
    """Adds `logits_to_keep` (positions t where some row's label t + 1 is not ignored) and `shift_labels`
    (labels[:, t + 1] there) to a collated batch: `model(**batch).loss` is then the loss of the whole batch,
    computed from the kept positions' logits only (`transformers.loss_utils.ForCausalLMLoss` reads
    `shift_labels` as given; the Trainer counts the loss's tokens from them too)."""
    labels = batch["labels"]
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    batch["logits_to_keep"] = positions
    batch["shift_labels"] = labels[:, positions + 1].contiguous()
    return batch


def _images(samples) -> dict:
    with_images = [s for s in samples if s.get("pixel_values") is not None]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([torch.as_tensor(s["pixel_values"]) for s in with_images]),
        "image_grid_thw": torch.cat([_as_long(s["image_grid_thw"]).reshape(-1, 3) for s in with_images]),
        "num_scales": torch.cat([_as_long(s["num_scales"]).reshape(-1) for s in with_images]),
    }


class PackedCollator:
    """Packs a batch of samples into one row, padding-free (see the module docstring)."""

    def __init__(self, labelled_logits: bool = False):
        self.labelled_logits = labelled_logits

    def __call__(self, samples: list[dict]) -> dict:
        _check(samples)
        batch = {
            "input_ids": torch.cat([_as_long(s["input_ids"]) for s in samples])[None],
            "labels": torch.cat([_labels(s) for s in samples])[None],
            "mm_token_type_ids": torch.cat([_as_long(s["mm_token_type_ids"]) for s in samples])[None],
            "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
        }
        batch.update(_images(samples))
        return keep_labelled_logits(batch) if self.labelled_logits else batch


class PaddedCollator:
    """The padded batch of the same samples: one row each, right-padded with `pad_token_id` to the longest
    (the labels with -100, the attention mask with 0). What packing is measured and tested against."""

    def __init__(self, pad_token_id: int, labelled_logits: bool = False):
        if pad_token_id is None:
            raise ValueError("PaddedCollator needs a pad_token_id")
        self.pad_token_id = int(pad_token_id)
        self.labelled_logits = labelled_logits

    def __call__(self, samples: list[dict]) -> dict:
        _check(samples)
        width = max(len(s["input_ids"]) for s in samples)
        rows = len(samples)
        batch = {
            "input_ids": torch.full((rows, width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long),
            "mm_token_type_ids": torch.zeros((rows, width), dtype=torch.long),
            "attention_mask": torch.zeros((rows, width), dtype=torch.long),
        }
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            batch["input_ids"][row, :n] = _as_long(sample["input_ids"])
            batch["labels"][row, :n] = _labels(sample)
            batch["mm_token_type_ids"][row, :n] = _as_long(sample["mm_token_type_ids"])
            batch["attention_mask"][row, :n] = 1
        batch.update(_images(samples))
        return keep_labelled_logits(batch) if self.labelled_logits else batch
