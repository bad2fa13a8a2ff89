"""Held-out measurements of a NaViL on a task's test split (records in the shapes task's chat format).

Teacher-forced, one packed forward per `batch` samples without gradients: `heldout_loss` (the cross-entropy
of the assistant tokens) and `first_token_accuracy` (is the most likely token after the prompt the answer's
first one?); generated: `chat_answers` (greedy `model.batch_chat`) and `exact_match` (their score, overall
and per kind). `blind_loss` is the loss to beat: that of a model that reads only the question. Every
measurement runs the model in eval mode without gradients (`evaluating`) and restores its training mode.
`benchmarks/learn_shapes.py` and the fusion sweep (`navil_hf.research.fusion`) measure with these.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from pathlib import Path

from navil_hf.tasks.shapes import ANSWERS, flat_score, score


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode without gradients; its training mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def encode_records(processor, path, count=None) -> list[dict]:
    """The first `count` (all when None) records of the jsonl `path`, encoded as `navil train` encodes them."""
    from navil_hf.training.data import ConversationDataset, SampleEncoder

    dataset = ConversationDataset([str(path)], SampleEncoder(processor))
    return [dataset[i] for i in range(len(dataset) if count is None else min(count, len(dataset)))]


def loss_batches(samples, batch):
    """Packed rows of `batch` samples each, with the positions whose next token is an assistant token:
    a list of (row without labels, positions, their next tokens, samples in the row)."""
    from navil_hf.training.collate import IGNORE_INDEX, PackedCollator

    collate = PackedCollator()
    out = []
    for start in range(0, len(samples), batch):
        row = collate(samples[start : start + batch])
        labels = row.pop("labels")[0]
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
        out.append((row, positions, labels[positions + 1], len(samples[start : start + batch])))
    return out


def heldout_loss(model, batches):
    """(nats per assistant token, nats per record): teacher-forced cross-entropy of the assistant tokens of
    `loss_batches`."""
    import torch.nn.functional as F

    total, tokens, records = 0.0, 0, 0
    with evaluating(model):
        for row, positions, targets, n in batches:
            logits = model(**row, logits_to_keep=positions, use_cache=False).logits[0].float()
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            tokens += len(targets)
            records += n
    return total / tokens, total / records


def first_token_accuracy(model, samples, records, batch):
    """Teacher-forced: does the model's most likely next token after the prompt equal the answer's first
    token? (Exact match's cheap stand-in for a learning curve: one packed forward per `batch` samples, no
    generation.) Overall and per kind of `records` (one per sample), as `shapes.score` returns them."""
    import torch

    from navil_hf.training.collate import IGNORE_INDEX, PackedCollator

    hits = []
    with evaluating(model):
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            packed = PackedCollator()(chunk)
            packed.pop("labels")
            firsts, offset = [], 0
            for sample in chunk:
                labels = torch.as_tensor(sample["labels"])
                first = int((labels != IGNORE_INDEX).nonzero()[0])
                firsts.append((offset + first - 1, int(labels[first])))
                offset += len(labels)
            positions = torch.tensor([p for p, _ in firsts])
            predicted = model(**packed, logits_to_keep=positions).logits[0].argmax(-1)
            hits += [int(p) == target for p, (_, target) in zip(predicted, firsts)]
    per_kind = {}
    for hit, record in zip(hits, records):
        per_kind.setdefault(record["kind"], []).append(hit)
    return {
        "accuracy": sum(hits) / len(hits),
        "per_kind": {k: {"accuracy": sum(v) / len(v)} for k, v in per_kind.items()},
    }


def chat_answers(model, processor, records, base_dir, batch: int = 32, max_new_tokens: int = 6) -> list[str]:
    """Greedy `model.batch_chat` answers to `records`' questions about their images (paths relative to
    `base_dir`), `batch` records per call, without gradients."""
    from PIL import Image

    answers = []
    with evaluating(model):
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            questions = [r["messages"][0]["content"][1]["text"] for r in chunk]
            images = [[Image.open(Path(base_dir) / r["messages"][0]["content"][0]["path"])] for r in chunk]
            answers += model.batch_chat(
                processor,
                questions,
                images=images,
                generation_config=dict(max_new_tokens=max_new_tokens, do_sample=False),
            )
    return answers


def exact_match(model, processor, records, base_dir, batch=32) -> dict:
    """Exact-match accuracy of greedy `chat_answers` (`shapes.score`): `accuracy` and `acc_KIND`."""
    return flat_score(score(chat_answers(model, processor, records, base_dir, batch), records))


def blind_loss(test_samples, test_records, train_records) -> dict:
    """The loss of a model that answers from the question alone: -log p(answer | question text), p the
    add-one smoothed answer frequencies of that question in the training split (its kind's answers when
    the question never occurs there), the format tokens free; per assistant token of `test_samples` (the
    encoded `test_records`) and per record."""
    from navil_hf.training.collate import IGNORE_INDEX

    per_question = defaultdict(Counter)
    for record in train_records:
        per_question[record["question"]][record["answer"]] += 1
    nats = 0.0
    for record in test_records:
        counts = per_question.get(record["question"], Counter())
        options = set(counts) | {record["answer"]} if counts else set(ANSWERS[record["kind"]])
        nats -= math.log((counts[record["answer"]] + 1) / (sum(counts.values()) + len(options)))
    tokens = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in test_samples)
    return {"per_token": nats / tokens, "per_answer": nats / len(test_records)}
