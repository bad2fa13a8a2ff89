"""The synthetic shapes VQA task (`navil_hf.tasks.shapes`): deterministic generation, records that agree
with the drawn pixels, disjoint splits, the baselines and the scorer, and the command line; and the held-out
measurements (`navil_hf.tasks.heldout`) on stand-in models."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from navil_hf.tasks import shapes
from navil_hf.tasks.shapes import (
    ANSWERS,
    KINDS,
    PALETTE,
    blind_accuracy,
    chance_accuracy,
    make_shapes_dataset,
    read_jsonl,
    score,
)

from conftest import REPO_ROOT

SMALL = {"train": 24, "test": 12, "seed": 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    summary = make_shapes_dataset(out, **SMALL)
    return out, summary


def files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def nearest_color(rgb):
    return min(PALETTE, key=lambda name: np.linalg.norm(np.asarray(rgb, float) - PALETTE[name]))


def in_box(x, y, box):
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    make_shapes_dataset(again, **SMALL)
    first, second = files(out), files(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first if name != "meta.json")
    other = tmp_path / "other"
    make_shapes_dataset(other, **{**SMALL, "seed": 4})
    assert files(other)["train.jsonl"] != first["train.jsonl"]


def test_records_are_chat_messages_with_relative_paths(dataset):
    out, summary = dataset
    for split in ("train", "test"):
        records = read_jsonl(out / f"{split}.jsonl")
        assert len(records) == SMALL[split] == summary["records"][split]
        for record in records:
            user, assistant = record["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            image, text = user["content"]
            assert image["type"] == "image" and text["type"] == "text"
            assert not Path(image["path"]).is_absolute() and image["path"].startswith(f"images/{split}_")
            assert text["text"].startswith(record["question"])
            assert assistant["content"] == [{"type": "text", "text": record["answer"]}]
            assert record["kind"] in KINDS and record["answer"] in ANSWERS[record["kind"]]
            with Image.open(out / image["path"]) as im:
                assert im.mode == "RGB" and list(im.size) == record["image_size"]
                assert all(side in (96, 128) for side in im.size)
    assert summary["answers"] == {k: list(v) for k, v in ANSWERS.items()}


def test_answers_agree_with_the_pixels(dataset):
    out, _ = dataset
    assert_records_agree_with_the_pixels(read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl"), out)


def test_mirrored_position_records(dataset, tmp_path):
    """Each held-out position question again about its image mirrored across the question's axis: the answer
    and the drawn geometry move with the pixels (checked as the generated records are)."""
    out, _ = dataset
    records = read_jsonl(out / "test.jsonl")
    mirrored = shapes.mirrored_position_records(records, out, tmp_path)
    originals = [r for r in records if r["kind"] == "position"]
    assert len(mirrored) == len(originals) > 0
    assert_records_agree_with_the_pixels(mirrored, tmp_path)
    for original, record in zip(originals, mirrored):
        assert record["answer"] == shapes.MIRRORED_ANSWER[original["answer"]] != original["answer"]
        assert record["question"] == original["question"] and len(record["messages"]) == 2
        with Image.open(out / original["messages"][0]["content"][0]["path"]) as a:
            with Image.open(tmp_path / record["messages"][0]["content"][0]["path"]) as b:
                axis = 1 if original["answer"] in ("left", "right") else 0
                np.testing.assert_array_equal(np.flip(np.asarray(a), axis), np.asarray(b))


def assert_records_agree_with_the_pixels(records, out):
    for record in records:
        pixels = np.asarray(Image.open(out / record["messages"][0]["content"][0]["path"]).convert("RGB"))
        height, width = pixels.shape[:2]
        drawn = record["shapes"]
        assert 1 <= len(drawn) <= 3
        for s in drawn:  # each shape has its color at its center
            x, y = s["center"]
            assert list(pixels[y, x]) == s["rgb"] and nearest_color(s["rgb"]) == s["color"]
        for a, b in ((a, b) for i, a in enumerate(drawn) for b in drawn[i + 1 :]):  # no overlaps
            ax0, ay0, ax1, ay1 = a["bbox"]
            bx0, by0, bx1, by1 = b["bbox"]
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
        for x, y in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1)):  # background
            if not any(in_box(x, y, s["bbox"]) for s in drawn):
                distance = min(np.linalg.norm(pixels[y, x].astype(float) - c) for c in PALETTE.values())
                assert distance > 50
        assert_answer(record["kind"], record["question"], record["answer"], drawn, drawn[0], width, height)


def assert_answer(kind, question, answer, drawn, target, width, height):
    """`answer` is right for `question` about the shapes `drawn`, `target` the one it asks about."""
    if kind == "count":
        assert answer == str(len(drawn))
    elif kind == "color":
        assert answer == target["color"]
        if len(drawn) == 1:
            assert question == "What color is the shape?"
        else:
            assert question == f"What color is the {target['shape']}?"
            assert [s["shape"] for s in drawn].count(target["shape"]) == 1
    elif kind == "shape":
        assert question == f"What shape is the {target['color']} object?" and answer == target["shape"]
        assert [s["color"] for s in drawn].count(target["color"]) == 1
    else:
        x0, y0, x1, y1 = target["bbox"]
        half = {"left": x1 < width // 2, "right": x0 >= width - width // 2}
        half |= {"top": y1 < height // 2, "bottom": y0 >= height - height // 2}
        assert half[answer]
        axis = "on the left or the right" if answer in ("left", "right") else "at the top or the bottom"
        ref = question.removeprefix("Is the ").removesuffix(f" {axis}?")
        if ref == "shape":
            assert len(drawn) == 1
        elif ref == f"{target['color']} shape":
            assert [s["color"] for s in drawn].count(target["color"]) == 1
        else:
            assert ref == target["shape"] and [s["shape"] for s in drawn].count(ref) == 1


def asked_about(kind, question, drawn):
    """The shape a question names (the first one for a count)."""
    if kind == "count" or len(drawn) == 1:
        return drawn[0]
    named = [s for s in drawn if f" {s['color']} " in question or f" {s['shape']}?" in question
             or f" {s['shape']} " in question]  # fmt: skip
    assert len(named) == 1, (question, drawn)
    return named[0]


def subject(kind, question, answer, drawn):
    """What a question asks about: the kind, the shape (by index) and, for a position, the axis."""
    axis = ("x" if answer in ("left", "right") else "y") if kind == "position" else None
    return kind, None if kind == "count" else drawn.index(asked_about(kind, question, drawn)), axis


def test_more_questions_per_train_image(dataset, tmp_path):
    """`questions=4`: the same images and test split; each train record keeps its own question first and
    adds up to three others about its image, each right by the pixels' geometry and about something not asked
    yet (not the same shape's color twice under two names, say), spread over the kinds."""
    out, _ = dataset
    more = tmp_path / "more"
    summary = make_shapes_dataset(more, **SMALL, questions=4)
    first, second = files(out), files(more)
    assert {k: v for k, v in first.items() if k not in ("meta.json", "train.jsonl")} == {
        k: v for k, v in second.items() if k not in ("meta.json", "train.jsonl")
    }
    assert summary["blind"] == make_shapes_dataset(tmp_path / "again", **SMALL)["blind"]
    turns, kinds = [], set()
    for single, record in zip(read_jsonl(out / "train.jsonl"), read_jsonl(more / "train.jsonl"), strict=True):
        messages = record["messages"]
        assert messages[:2] == single["messages"] and {**record, "messages": None} == {**single, "messages": None}
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        turns.append(len(messages) // 2)
        width, height = record["image_size"]
        asked = [single["question"]]
        subjects = {subject(single["kind"], single["question"], single["answer"], record["shapes"])}
        for user, assistant in zip(messages[2::2], messages[3::2]):
            (item,) = user["content"]  # text only: the image is the first turn's
            question = item["text"].removesuffix(f" {shapes.ANSWER_HINT}")
            (answer,) = (c["text"] for c in assistant["content"])
            kind = next(k for k in KINDS if answer in ANSWERS[k])
            drawn = record["shapes"]
            assert_answer(kind, question, answer, drawn, asked_about(kind, question, drawn), width, height)
            assert question not in asked
            asked.append(question)
            assert subject(kind, question, answer, drawn) not in subjects
            subjects.add(subject(kind, question, answer, drawn))
            kinds.add(kind)
    # one turn only where nothing else can be asked (e.g. a count of two red circles)
    assert max(turns) == 4 and sum(t >= 3 for t in turns) >= 0.75 * len(turns) and kinds == set(KINDS)
    # fewer kinds: the extra questions are of those kinds only
    color_shape = make_shapes_dataset(tmp_path / "cs", **SMALL, kinds=("color", "shape"), questions=3)
    assert color_shape["params"]["questions"] == 3
    for record in read_jsonl(tmp_path / "cs" / "train.jsonl"):
        for assistant in record["messages"][1::2]:
            assert assistant["content"][0]["text"] in ANSWERS["color"] + ANSWERS["shape"]
    with pytest.raises(ValueError, match="questions must be a positive int"):
        make_shapes_dataset(tmp_path / "bad", **SMALL, questions=0)


def test_all_questions_holds_each_record_own_question(dataset):
    out, _ = dataset
    for record in read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl"):
        assert (record["kind"], record["question"], record["answer"]) in shapes.all_questions(record)


def test_splits_are_balanced_and_disjoint(dataset):
    out, summary = dataset
    digests = {}
    for split in ("train", "test"):
        records = read_jsonl(out / f"{split}.jsonl")
        assert summary["counts"][split] == {k: SMALL[split] // 4 for k in KINDS}
        digests[split] = {
            hashlib.sha256((out / r["messages"][0]["content"][0]["path"]).read_bytes()).digest() for r in records
        }
        assert len(digests[split]) == len(records)
    assert not digests["train"] & digests["test"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["seed"] == SMALL["seed"] and meta["summary"]["counts"] == summary["counts"]


def test_an_image_seen_before_is_drawn_again(tmp_path):
    sides = [96, 128]
    for name in ("a", "b"):
        (tmp_path / name / "images").mkdir(parents=True)
    first, seen = shapes._generate_split(tmp_path / "a", "train", 4, 0, sides, KINDS, set())
    second, _ = shapes._generate_split(tmp_path / "b", "train", 4, 0, sides, KINDS, seen)
    assert [(r["kind"], r["answer"]) for r in first] == [(r["kind"], r["answer"]) for r in second]
    for r in first:
        path = r["messages"][0]["content"][0]["path"]
        assert (tmp_path / "a" / path).read_bytes() != (tmp_path / "b" / path).read_bytes()


def test_every_shape_covers_a_merged_token(dataset):
    """Shapes under one 32-px merged token kept earlier models blind (issue 25): at native resolution every
    shape is >= 32 px and the asked-about one >= 40; with the demo model's processor (min_pixels 128 x 128)
    the asked-about one stays >= 40, while a processor that shrinks the images says so."""
    out, _ = dataset
    records = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    kinds = {r["kind"] for r in records}
    assert kinds == set(KINDS)
    shapes_per_image = [len(r["shapes"]) for r in records]
    assert min(shapes_per_image) == 1 and max(shapes_per_image) == 3
    assert all(s["size"] >= shapes.MIN_SHAPE_SIZE for r in records for s in r["shapes"])
    assert all(r["shapes"][0]["size"] >= shapes.MIN_TARGET_SIZE for r in records)
    assert {tuple(r["image_size"]) for r in records} >= {(96, 96), (96, 128), (128, 96)}  # square, tall, wide
    assert shapes.smallest_target_side(records, 128 * 128, 1024 * 1024) >= shapes.MIN_TARGET_SIZE
    assert shapes.smallest_target_side(records, 32 * 32, 48 * 48) < shapes.MERGED_TOKEN


def test_image_sides_too_small_for_the_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 84 pixels"):
        make_shapes_dataset(tmp_path / "d", train=2, test=2, image_size=(64, 96))


def record(kind, answer, question="q"):
    return {"kind": kind, "answer": answer, "question": question}


def test_chance_and_blind_baselines():
    records = [record("count", "1"), record("count", "1"), record("count", "2"), record("count", "3")]
    records += [record("color", "red"), record("color", "blue")]
    # count: majority 2/4; color: majority 1/2 (above the floor 1/6)
    assert chance_accuracy(records) == pytest.approx((2 + 1) / 6)
    # the floor: one position record is at least 1/4 ... and at most 1 by majority
    assert chance_accuracy([record("position", "left")]) == 1.0
    assert chance_accuracy([]) == 0.0
    train = [record("position", "left", "L?"), record("position", "left", "L?"), record("position", "top", "T?")]
    test = [record("position", "left", "L?"), record("position", "right", "L?"), record("position", "top", "new?")]
    # "L?" -> left (1 of 2 right), an unseen question -> the kind's majority, left (wrong)
    assert blind_accuracy(test, train) == pytest.approx(1 / 3)


def test_score():
    records = [record("color", "red"), record("shape", "circle"), record("count", "2"), record("position", "left")]
    result = score([" Red.", "circle shape", "two", "right"], records)
    assert result["accuracy"] == 0.75 and result["correct"] == 3 and result["total"] == 4
    assert result["per_kind"]["position"] == {"accuracy": 0.0, "correct": 0, "total": 1}
    assert result["per_kind"]["color"]["accuracy"] == 1.0
    assert score(["The color is red", "", "2!", "LEFT"], records)["correct"] == 2
    assert score({0: "red"}, records)["correct"] == 1  # missing predictions are wrong
    with pytest.raises(ValueError, match="3 predictions for 4 records"):
        score(["red"] * 3, records)


def test_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert shapes.main([str(out), "--train", "4", "--test", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--force" in err
    assert shapes.main([str(out), "--train", "8", "--test", "4", "--force"]) == 0
    assert shapes.main([str(out), "--train", "4", "--test", "4", "--force"]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"test_{i:05d}.png" for i in range(4)] + [f"train_{i:05d}.png" for i in range(4)]
    assert (out / "keep.txt").read_text() == "mine"
    assert "overall" in capsys.readouterr().out
    assert shapes.main([str(tmp_path / "x"), "--image-size", "16", "16"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        shapes.main([str(tmp_path / "y"), "--train", "-1"])
    assert exit_info.value.code == 2


def test_module_entry_point(tmp_path):
    out = tmp_path / "data"
    args = [sys.executable, "-m", "navil_hf.tasks.shapes", str(out), "--train", "4", "--test", "4", "--json"]
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records"] == {"train": 4, "test": 4}
    again = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and not again.stdout


# ------------------------------------------------------------------------- held-out measurements (heldout.py)


class _Reader:
    """A stand-in model that reads the packed row: at position t it predicts the token at t + `shift` (1: the
    next token, a model that knows every answer; 0: the token at t itself), with `logit` over a vocabulary
    of `vocab` (0 elsewhere)."""

    training = False

    def __init__(self, shift, vocab=16, logit=10.0):
        self.shift, self.vocab, self.logit = shift, vocab, logit

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, logits_to_keep, **kwargs):
        import torch

        ids = input_ids[0, logits_to_keep + self.shift]
        logits = torch.zeros(len(logits_to_keep), self.vocab)
        logits[torch.arange(len(ids)), ids] = self.logit
        return type("Output", (), {"logits": logits[None]})


def _sample(prompt, answer):
    """A text sample as `SampleEncoder` makes one: the prompt's labels ignored, the answer's kept."""
    import torch

    from navil_hf.training.collate import IGNORE_INDEX

    ids = torch.tensor(prompt + answer)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + answer)
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": torch.zeros_like(ids)}


def test_first_token_accuracy_and_heldout_loss_read_the_answer_positions():
    """A model that predicts the next token gets every first answer token right and the least loss; one that
    predicts the current token (an off-by-one in the positions) gets them wrong; a uniform one has loss
    log(vocab) per answer token. Packed three to a row, so the offsets of later samples count too."""
    import math

    from navil_hf.tasks.heldout import first_token_accuracy, heldout_loss, loss_batches

    samples = [_sample([1, 2, 3], [7, 8]), _sample([4, 5], [9]), _sample([1, 6, 2, 3], [10, 11, 12]),
               _sample([2, 3], [13, 14])]  # fmt: skip
    records = [record("color", "red"), record("count", "2"), record("color", "blue"), record("shape", "circle")]
    right = first_token_accuracy(_Reader(shift=1), samples, records, batch=3)
    assert right == {"accuracy": 1.0, "per_kind": {k: {"accuracy": 1.0} for k in ("color", "count", "shape")}}
    assert first_token_accuracy(_Reader(shift=0), samples, records, batch=3)["accuracy"] == 0.0
    batches = loss_batches(samples, 3)
    assert [n for *_, n in batches] == [3, 1] and sum(len(targets) for _, _, targets, _ in batches) == 8
    per_token, per_record = heldout_loss(_Reader(shift=1), batches)
    best = -math.log(math.exp(10) / (math.exp(10) + 15))  # the right token at logit 10, 15 others at 0
    assert per_token == pytest.approx(best, rel=1e-4) and per_record == pytest.approx(best * 8 / 4, rel=1e-4)
    assert heldout_loss(_Reader(shift=1, logit=0.0), batches)[0] == pytest.approx(math.log(16))  # uniform
