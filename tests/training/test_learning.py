"""Learning in CI: a NaViL trained with `navil train` learns to use its image.

A tiny NaViL (a tiny random Qwen3 through `navil init-from-llm --vision-preset none`: early fusion, the
16-px patches' embedding -> 2x2 merge -> connector -> LLM) is trained with `navil train`'s own code (packed
rows, the Trainer) on color questions of the shapes task (`navil_hf.tasks.shapes`: one shape, 60-85% of
the short side, on square, tall and wide images with varied backgrounds), one thread, fixed seed (about a
minute). On held-out images it must name the asked-about
shape's color far above chance (1/6), and given another image with the same question its answer must follow
that image (the swap test): a change that stops the model from seeing (pixels that do not reach the LLM,
image tokens on the wrong slots, a sample attending another's image) fails here.

Answers are scored as a closed set: the color whose whole answer (its tokens and the end of the turn) has the
highest likelihood, from one packed forward over all candidates of a record.
"""

from collections import defaultdict

import pytest
import torch

from navil_hf.cli import main as navil
from navil_hf.tasks.shapes import ANSWERS, make_shapes_dataset, read_jsonl
from navil_hf.training.collate import IGNORE_INDEX, PackedCollator
from navil_hf.training.data import SampleEncoder, parse_record
from navil_hf.training.train import load_model, load_processor, parse_config, train

from llm_sources import write_hf_llm

COLORS = ANSWERS["color"]
STEPS, BATCH = 200, 16
MIN_ACCURACY, MIN_SWAP = 0.75, 0.75  # chance is 1/6


def _with_image_and_answer(record, image_path, answer):
    user, _ = record["messages"]
    content = [{"type": "image", "path": image_path}, user["content"][1]]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("learning")
        write_hf_llm(root / "llm", "qwen3", seed=0)
        # 96-128 px images at native resolution (36 to 64 patches: 9 to 16 image tokens, one scale)
        argv = ["init-from-llm", str(root / "llm"), str(root / "navil"), "--vision-preset", "none",
                "--min-dynamic-patch", "36", "--max-dynamic-patch", "64", "--seed", "0", "-q"]  # fmt: skip
        assert navil(argv) == 0
        summary = make_shapes_dataset(root / "data", train=STEPS * BATCH // 2, test=60, seed=0, kinds=("color",),
                                      max_shapes=1, target_fraction=(0.6, 0.85))  # fmt: skip
        training = {
            "max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": 2e-3,
            "lr_scheduler_type": "cosine", "warmup_steps": 20, "weight_decay": 0.0, "logging_steps": 20,
            "save_steps": STEPS, "disable_tqdm": True, "report_to": "none", "dataloader_num_workers": 0,
        }  # fmt: skip
        config = parse_config({
            "model": str(root / "navil"), "output_dir": str(root / "run"), "train": "full", "seed": 0,
            "data": {"train": str(root / "data" / "train.jsonl")}, "training": training,
        })  # fmt: skip
        result = train(config, force=True)
        model = load_model(result.model_dir).eval()
        processor = load_processor(result.model_dir)
        yield model, processor, root / "data", summary
    finally:
        torch.set_num_threads(threads)


def _predict(model, processor, data, cases):
    """The most likely color for each (record, image path) case, from one packed forward per case."""
    encoder = SampleEncoder(processor)

    def encode(record):
        return encoder(parse_record(record, data, "auto", "test"))

    predictions = []
    with torch.no_grad():
        for record, image in cases:
            samples = [encode(_with_image_and_answer(record, image, color)) for color in COLORS]
            batch = PackedCollator()(samples)
            labels = batch.pop("labels")[0]
            logits = model(**batch).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], -1)
            targets = labels[1:]
            kept = targets != IGNORE_INDEX
            token_scores = torch.zeros_like(targets, dtype=logprobs.dtype)
            token_scores[kept] = logprobs[kept].gather(-1, targets[kept, None])[:, 0]
            scores, start = [], 0
            for sample in samples:  # each sample's answer tokens (the shift moves them one slot left)
                n = len(sample["input_ids"])
                scores.append(token_scores[max(start - 1, 0) : start + n - 1].sum().item())
                start += n
            predictions.append(COLORS[max(range(len(COLORS)), key=scores.__getitem__)])
    return predictions


def _image_of(record):
    return record["messages"][0]["content"][0]["path"]


@pytest.mark.slow
def test_a_trained_navil_answers_from_its_image(trained):
    model, processor, data, summary = trained
    test = read_jsonl(data / "test.jsonl")
    assert {tuple(r["image_size"]) for r in test} >= {(96, 96), (96, 128), (128, 96)}
    predictions = _predict(model, processor, data, [(r, _image_of(r)) for r in test])
    accuracy = sum(p == r["answer"] for p, r in zip(predictions, test)) / len(test)
    blind = summary["blind"]["overall"]
    print(f"held-out color accuracy {accuracy:.3f} (chance {summary['chance']['overall']:.3f}, blind {blind:.3f})")
    assert accuracy >= MIN_ACCURACY

    # The swap test: the same question about another image (one asking about the same shape, with
    # another answer): the answer must follow the image, not the question.
    by_question = defaultdict(list)
    for record in test:
        by_question[record["question"]].append(record)
    swaps = []
    for group in by_question.values():
        for record in group:
            other = next((o for o in group if o["answer"] != record["answer"]), None)
            if other is not None:
                swaps.append((record, other))
    assert len(swaps) >= 20
    predicted = _predict(model, processor, data, [(record, _image_of(other)) for record, other in swaps])
    follows = sum(p == other["answer"] for p, (_, other) in zip(predicted, swaps)) / len(swaps)
    print(f"swap test: the answer follows the image in {follows:.3f} of {len(swaps)} swaps")
    assert follows >= MIN_SWAP
