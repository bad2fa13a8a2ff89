"""The benchmark scripts' --quick smoke runs: they run, and their equality checks hold (a routed
model must equal the dense one it is timed against, in training its gradients too; a packed batch's
loss must equal the padded batch's; the processor's pixel_values must equal the straightforward
pipeline's, the vision encoder builds no patches^2 tensor). No timing asserts."""

import importlib
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _script(name):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", ["layer", "text_model", "decode", "preprocess", "vision", "train_step"])
def test_quick_run(name, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        _script(name).main(["--quick"])  # raises if an equality check fails
    finally:
        torch.set_num_threads(threads)  # quick runs use one thread
    assert "| target |" in capsys.readouterr().out or name == "vision"


def test_convert_memory_quick_run(tmp_path, capsys):
    """The conversion memory benchmark builds a synthetic original checkpoint and converts it, verified."""
    _script("convert_memory").main(["--quick", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "navil convert --dtype auto (verified)" in out and "identical logits" in out
    _script("convert_memory").main(["--quick", "--task", "init", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "navil init-from-llm" in out and "identical logits" in out


def test_gpu_script_quick_runs_anywhere(capsys):
    """The GPU script's code paths (parity, measured peak, prefill FLOPs, decode) at tiny sizes on CPU."""
    _script("gpu").main(["--quick"])
    out = capsys.readouterr().out
    for row in ("matmul peak", "vision features", "logits", "prefill 256 tokens", "MFU", "decode batch 32"):
        assert row in out, row


def test_gpu_script_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: gpu.py would run the real measurements")
    with pytest.raises(SystemExit, match="no CUDA device"):
        _script("gpu").main([])


def test_learn_shapes_quick_run(tmp_path, capsys):
    """The learning proof's recipe end to end for a few steps (the shapes task, `navil train`, held-out
    first-token curve, exact match through `batch_chat` of the saved folder) on a converted fixture."""
    from navil_hf.conversion import convert_checkpoint

    from conftest import fixtures_dir

    hub = tmp_path / "hub"
    convert_checkpoint(fixtures_dir() / "original-qwen3-tiny" / "checkpoint", hub, progress=False)
    summary = _script("learn_shapes").main(["--quick", "--model", str(hub), "--workdir", str(tmp_path / "work")])
    assert [a["step"] for a in summary["accuracy"]] == [1, 3]
    assert all(0 <= a["accuracy"] <= 1 for a in summary["accuracy"]) and 0 <= summary["exact_match"]["accuracy"] <= 1
    assert len(summary["answers"]) == 8 and isinstance(summary["bf16"], bool)
    assert summary["precision"].startswith("bf16: " if summary["bf16"] else "float32: ")
    # the curriculum: 1 step on color questions alone, then 2 on all kinds
    assert len(summary["curve"]) == 3 and (tmp_path / "work" / "run-all" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "run-color" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "learning_curve.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "held-out first-token accuracy" in out and "held-out exact match" in out


def test_fusion_sweep_quick_run(tmp_path, capsys):
    """The late- vs early-fusion sweep end to end for a few steps: tiny from-scratch models of both variants
    (the fixture's tokenizer), rows with finite held-out losses in the CSV files `navil scaling fit` reads,
    the comparison plot, and per variant a fit that runs or says why it cannot."""
    import csv
    import math

    from navil_hf.conversion import convert_checkpoint
    from navil_hf.research.scaling import read_runs

    from conftest import fixtures_dir

    hub = tmp_path / "hub"
    convert_checkpoint(fixtures_dir() / "original-qwen3-tiny" / "checkpoint", hub, progress=False)
    work = tmp_path / "work"
    summary = _script("fusion_sweep").main(["--quick", "--tokenizer", str(hub), "--workdir", str(work)])
    with open(work / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"late", "early"} and len({r["name"] for r in rows}) == 4
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    for run in summary["runs"]:
        tokens = [row["D"] for row in run["rows"]]
        assert tokens == sorted(tokens) and tokens[0] > 0 and "accuracy" in run["final"]
    late, early = (
        {r["size_name"]: r["params"]["N"] for r in summary["runs"] if r["variant"] == v} for v in ("late", "early")
    )
    assert all(late[size] > early[size] for size in late)  # the ViT blocks
    for variant in ("late", "early"):
        runs = read_runs(work / f"runs-{variant}.csv")
        assert len(runs) == sum(r["variant"] == variant for r in rows)
        fit = summary["fits"][variant]
        assert "parameters" in fit or "needs at least" in fit["skipped"]
    assert (work / "fusion_sweep.png").stat().st_size > 0 and (work / "results.json").is_file()
    assert "sweep ETA" in capsys.readouterr().out
