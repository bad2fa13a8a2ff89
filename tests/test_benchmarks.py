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
    scoring through `batch_chat`) on a converted fixture; the trained folder is written."""
    from navil_hf.conversion import convert_checkpoint

    from conftest import fixtures_dir

    hub = tmp_path / "hub"
    convert_checkpoint(fixtures_dir() / "original-qwen3-tiny" / "checkpoint", hub, progress=False)
    summary = _script("learn_shapes").main(["--quick", "--model", str(hub), "--workdir", str(tmp_path / "work")])
    assert [a["step"] for a in summary["accuracy"]] == [0, 3]
    assert len(summary["curve"]) == 3 and (tmp_path / "work" / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "learning_curve.png").stat().st_size > 0
    assert "held-out accuracy" in capsys.readouterr().out
