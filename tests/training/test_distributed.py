"""`navil train` on several processes (CPU, gloo, 2 processes under torchrun): data-parallel (DDP) and FSDP2
training give the per-step losses, gradient norms and final weights of one process training on the
batches of both; a batch without images on one process neither errors nor hangs; an FSDP2 run resumed
from its optimizer checkpoint ends with the weights of the uninterrupted run.

The equivalence runs use plain SGD, whose update is linear in the gradient, so the final weights agree to
fp32 noise (rtol 1e-5, atol 1e-6 against a largest movement of ~5e-2). AdamW's update g / (sqrt(v) + eps) turns
reduction-order noise in near-zero gradients into changes of up to a few percent of the learning rate in a
handful of weights; the resume test (AdamW, whose state is what it checkpoints) compares FSDP2 runs only.

Every run is a subprocess (tests/distributed_train.py), so no process group or accelerate state leaks into
the test process; each is killed with its process group when it outlives RUN_TIMEOUT (a batch without
images on one process hangs DDP and aborts FSDP2 when the vision encoder sits the step out). accelerate
runs CPU processes as DDP whatever `fsdp` says; the launcher makes them FSDP as GPU processes would be
(`distributed_train.fsdp_on_cpu`), and the test checks that the model was sharded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import fixtures_dir

pytestmark = [
    pytest.mark.slow,  # torchrun runs
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
]

LAUNCHER = Path(__file__).resolve().parents[1] / "distributed_train.py"
RUN_TIMEOUT = 240  # seconds per run (one takes 15-40 s on 2 cores); a hang is killed then
STEPS, PROCESSES, PER_DEVICE = 4, 2, 1  # 4 steps of 2 samples: the 8 records once, each on its own
WEIGHTS = {"rtol": 1e-5, "atol": 1e-6}
LOGGED = {"rtol": 1e-5, "atol": 0.0}  # loss and grad_norm per step
FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["NaViLDecoderLayer", "NaViLVisionBlock"]}}  # fmt: skip


def _record(i: int, image: str | None) -> dict:
    question = [{"type": "image", "path": f"img/{image}"}] if image else []
    question.append({"type": "text", "text": f"What is shown in picture {i}?" if image else f"Say {i}."})
    answer = f"A thing number {i}" + " and more" * (i % 3) + "."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# Images of three sizes and one text-only record (index 5): whichever step it lands in, it is the only
# sample of its process there while the other process has an image; the labelled-token counts differ per
# process, which the Trainer's cross-process token count (average_tokens_across_devices) makes exact.
IMAGES = ["a.png", "b.png", "c.png", "a.png", "b.png", None, "c.png", "a.png"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, qwen3_folder):
    root = tmp_path_factory.mktemp("distributed")
    source = fixtures_dir() / "original-qwen3-tiny"
    shutil.copytree(qwen3_folder, root / "hub")
    images = root / "data" / "img"
    images.mkdir(parents=True)
    Image.open(source / "image0.png").convert("RGB").resize((48, 32)).save(images / "a.png")
    Image.open(source / "image1.png").convert("RGB").resize((32, 48)).save(images / "b.png")
    Image.open(source / "image0.png").convert("RGB").resize((32, 32)).save(images / "c.png")
    lines = [json.dumps(_record(i, image)) + "\n" for i, image in enumerate(IMAGES)]
    (root / "data" / "train.jsonl").write_text("".join(lines))
    return root


def _config(workdir: Path, name: str, processes: int, optim: str, **training) -> Path:
    """A run's YAML: the global batch is PROCESSES * PER_DEVICE samples whatever `processes` is."""
    settings = {
        "max_steps": STEPS,
        "per_device_train_batch_size": PER_DEVICE * PROCESSES // processes,
        "logging_steps": 1,
        "save_steps": 2,
        "lr_scheduler_type": "constant",
        **({"optim": "sgd", "learning_rate": 0.5} if optim == "sgd" else {"learning_rate": 1.0e-3}),
        **training,
    }
    config = {"model": "hub", "output_dir": f"runs/{name}", "data": {"train": "data/train.jsonl"}, "seed": 3,
              "training": settings}  # fmt: skip
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _launch(workdir: Path, config: Path, processes: int, *extra: str) -> list[dict]:
    """Runs the training command on `processes` processes; every process's record, by rank."""
    result = workdir / "results" / config.stem
    result.parent.mkdir(exist_ok=True)
    command = [sys.executable, str(LAUNCHER), str(config), str(result), *extra]
    if processes > 1:  # torchrun; --standalone: a free port of its own choice
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{config.stem}: no result after {RUN_TIMEOUT} s (hung?)\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"{config.stem} failed (exit {process.returncode}):\n{output[-6000:]}")
    records = [json.loads(Path(f"{result}.rank{rank}.json").read_text()) for rank in range(processes)]
    assert [r["world_size"] for r in records] == [processes] * processes, output[-3000:]
    return records


def _weights(workdir: Path, name: str, where="model") -> dict:
    return load_file(workdir / "runs" / name / where / "model.safetensors")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_weights_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **WEIGHTS, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def runs(workdir):
    """The runs, each launched when a test first needs it."""
    cache = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            if name == "single":
                cache[name] = _launch(workdir, _config(workdir, name, 1, "sgd"), 1)
            elif name == "ddp":
                cache[name] = _launch(workdir, _config(workdir, name, PROCESSES, "sgd"), PROCESSES)
            elif name == "fsdp2":
                cache[name] = _launch(workdir, _config(workdir, name, PROCESSES, "sgd", **FSDP2), PROCESSES)
            elif name == "fsdp2-adamw":
                cache[name] = _launch(workdir, _config(workdir, name, PROCESSES, "adamw", **FSDP2), PROCESSES)
            elif name == "fsdp2-adamw-resumed":
                get("fsdp2-adamw")
                out = workdir / "runs" / name / "checkpoints"
                shutil.copytree(workdir / "runs" / "fsdp2-adamw" / "checkpoints" / "checkpoint-2", out / "checkpoint-2")
                config = _config(workdir, name, PROCESSES, "adamw", **FSDP2)
                cache[name] = _launch(workdir, config, PROCESSES, "--resume")
            else:
                raise KeyError(name)
        return cache[name]

    return get


def _assert_logged_equal(records: list[dict], reference: dict):
    for record in records:  # every process logs the loss and grad_norm averaged over all of them
        assert record["steps"] == reference["steps"] == list(range(1, STEPS + 1))
        torch.testing.assert_close(record["losses"], reference["losses"], **LOGGED)
        torch.testing.assert_close(record["grad_norms"], reference["grad_norms"], **LOGGED)


def _assert_trained_like_single(workdir, runs, name: str):
    (single,), records = runs("single"), runs(name)
    assert [r["rank"] for r in records] == list(range(PROCESSES))
    assert all(r["global_step"] == STEPS for r in records)
    _assert_logged_equal(records, single)
    # It learned: the loss fell and the weights moved far more than the tolerance.
    assert single["losses"][-1] < single["losses"][0] - 0.5, single["losses"]
    initial = load_file(workdir / "hub" / "model.safetensors")
    expected = _weights(workdir, "single")
    assert _max_difference(expected, initial) > 1e-2
    _assert_weights_close(_weights(workdir, name), expected)
    # Every process saw its half of every step: one sample each, together the single process's batches.
    for step in range(STEPS):
        per_process = [r["batches"][step] for r in records]
        assert [b["samples"] for b in per_process] == [PER_DEVICE] * PROCESSES
        assert sum(b["labelled"] for b in per_process) == single["batches"][step]["labelled"]


def test_ddp_equals_one_process(workdir, runs):
    records = runs("ddp")
    assert all(r["parallel_mode"] == "ParallelMode.DISTRIBUTED" and r["fsdp_units"] == [] for r in records)
    _assert_trained_like_single(workdir, runs, "ddp")


def test_fsdp2_equals_one_process(workdir, runs):
    records = runs("fsdp2")
    for record in records:  # sharded per decoder layer and vision block, and as a whole
        assert {"FSDPNaViLDecoderLayer", "FSDPNaViLVisionBlock", "FSDPNaViLForConditionalGeneration"} <= set(
            record["fsdp_units"]
        ), record["fsdp_units"]
    _assert_trained_like_single(workdir, runs, "fsdp2")


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_batch_without_images_on_one_process(runs, name):
    """A step where one process has only the text-only sample and the other an image: no unused-parameter
    error (DDP runs with find_unused_parameters=False) and no hang (FSDP2 all-gathers the vision blocks on
    both processes); the step's loss is the single process's (test_*_equals_one_process)."""
    records = runs(name)
    mixed = [step for step in range(STEPS) if sorted(r["batches"][step]["images"] for r in records) == [False, True]]
    assert len(mixed) == 1, [[b["images"] for b in r["batches"]] for r in records]
    assert all(r["global_step"] == STEPS for r in records)


def test_fsdp2_resume_equals_uninterrupted(workdir, runs):
    uninterrupted, resumed = runs("fsdp2-adamw"), runs("fsdp2-adamw-resumed")
    assert all(r["optimizer"] == "AdamW" for r in uninterrupted)
    # An FSDP checkpoint: the gathered model and optimizer state as accelerate's FSDP saving writes them.
    saved = workdir / "runs" / "fsdp2-adamw" / "checkpoints" / "checkpoint-2"
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "rng_state_0.pth", "rng_state_1.pth"} <= {
        path.name for path in saved.iterdir()
    }
    assert [r["start_step"] for r in resumed] == [2] * PROCESSES
    assert all(r["global_step"] == STEPS for r in resumed)
    # The resumed run logs steps 3 and 4 only, with the uninterrupted run's losses and gradient norms.
    for record in resumed:
        assert record["steps"] == [3, 4]
        torch.testing.assert_close(record["losses"], uninterrupted[0]["losses"][2:], **LOGGED)
        torch.testing.assert_close(record["grad_norms"], uninterrupted[0]["grad_norms"][2:], **LOGGED)
    expected = _weights(workdir, "fsdp2-adamw")
    checkpoint = _weights(workdir, "fsdp2-adamw", "checkpoints/checkpoint-2")
    assert _max_difference(expected, checkpoint) > 1e-4  # steps 3 and 4 moved the weights
    _assert_weights_close(_weights(workdir, "fsdp2-adamw-resumed"), expected)
