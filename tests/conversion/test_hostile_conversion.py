"""Hostile and broken checkpoints, careless commands, kills: conversion never runs a checkpoint's code,
never loses a file, and ends every user mistake in one line (exit 2)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from navil_hf.cli import main as navil
from navil_hf.folders import clean_stale_temporaries, publish
from navil_hf.hub import only_our_code

from conftest import checkpoint, copy_checkpoint, usage_error

ROOT = Path(__file__).resolve().parents[2]


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------
# 1. A checkpoint's code never runs, and converted folders carry only ours

EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("reference", ["evil_tok.EvilTokenizer", "someone/evil--evil_tok.EvilTokenizer"])
def test_tokenizer_auto_map_never_runs_and_is_dropped(tmp_path, capsys, reference):
    marker = tmp_path / "PWNED"
    source = copy_checkpoint("qwen3", tmp_path / "ckpt")
    (source / "evil_tok.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    edit_json(source / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": [reference, reference]}))
    out = tmp_path / "out"
    assert navil(["convert", str(source), str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "notice: dropped tokenizer_config.json auto_map AutoTokenizer" in printed
    assert not marker.exists()
    assert not (out / "evil_tok.py").exists()
    assert "evil" not in (out / "tokenizer_config.json").read_text()
    # Whoever loads the converted folder (trusting it) runs only our code.
    from transformers import AutoModel, AutoProcessor

    AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert not marker.exists()


def test_only_our_code_keeps_our_references_and_drops_the_rest(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "configuration_navil.NaViLConfig"}}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoProcessor": "processing_navil.NaViLProcessor", "AutoTokenizer": ["x.Y", None]}})
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"auto_map": {"AutoImageProcessor": "o/r--m.C"}}))
    (tmp_path / "tokenization_x.py").write_text("raise SystemExit")
    notices = only_our_code(tmp_path)
    assert len(notices) == 3
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_navil.NaViLConfig"
    }
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_navil.NaViLProcessor"
    }
    assert "auto_map" not in json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert not (tmp_path / "tokenization_x.py").exists()


# ---------------------------------------------------------------------------------------------------
# 2. --force replaces OUT_DIR only: never the source, a folder holding it, or a folder that is not ours


def test_force_never_touches_the_source(tmp_path, capsys):
    parent = tmp_path / "P"
    source = copy_checkpoint("qwen3", parent / "ckpt")
    (parent / "notes.txt").write_text("mine")
    before = sorted(p.name for p in source.iterdir())
    assert "is the source" in usage_error(capsys, ["convert", "--force", source, source])
    assert "contains the source" in usage_error(capsys, ["convert", "--force", source, parent])
    assert "lies inside the source" in usage_error(capsys, ["convert", "--force", source, source / "out"])
    assert sorted(p.name for p in source.iterdir()) == before and (parent / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_that_is_not_ours(tmp_path, capsys):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = usage_error(capsys, ["convert", "--force", checkpoint("qwen3"), mine])
    assert "not a folder this command writes" in err and "will not delete it" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    # An empty folder and a NaViL folder are replaced.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert navil(["convert", "--force", "--no-verify", "-q", str(checkpoint("qwen3")), str(empty)]) == 0
    assert navil(["convert", "--force", "--no-verify", "-q", str(checkpoint("qwen3")), str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()


def test_unwritable_parent_and_full_disk_are_one_line(tmp_path, capsys, monkeypatch):
    # (Tests run as root here, where chmod cannot make a folder unwritable: the check is what is tested.)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    assert "cannot write in" in usage_error(capsys, ["convert", checkpoint("qwen3"), tmp_path / "out"])
    monkeypatch.setattr(os, "access", real_access)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr("navil_hf.hub.Path.write_text", full)
    err = usage_error(capsys, ["convert", "-q", checkpoint("qwen3"), tmp_path / "out"])
    assert "No space left on device" in err and "README.md" in err
    assert [p.name for p in tmp_path.iterdir()] == []


# ---------------------------------------------------------------------------------------------------
# 5. Publishing is atomic; interrupted runs are cleaned up by the next one


def _folder_state(out):
    """'old', 'new' or a description of a broken state."""
    if not out.is_dir():
        return "missing"
    names = {p.name for p in out.iterdir()}
    if names == {"config.json", "old.txt"}:
        return "old"
    if {"config.json", "model.safetensors", "README.md", "modeling_navil.py"} <= names and "old.txt" not in names:
        return "new"
    return f"broken: {sorted(names)}"


def _old_folder(out):
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "navil"}')
    (out / "old.txt").write_text("previous")


def _force_convert_command(out):
    """`navil convert --force` of the qwen3 fixture into `out`, as a command line and its environment."""
    command = [
        sys.executable,
        "-m",
        "navil_hf",
        "convert",
        "--force",
        "--no-verify",
        "-q",
        str(checkpoint("qwen3")),
        str(out),
    ]
    return command, dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_kill_at_any_moment_leaves_the_old_or_the_new_folder(tmp_path):
    out = tmp_path / "out"
    command, env = _force_convert_command(out)
    seen = set()
    for delay in (0.5, 1.5, 2.5, 3.0, 3.5, 4.0, 5.0):
        shutil.rmtree(out, ignore_errors=True)
        _old_folder(out)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = _folder_state(out)
        assert state in ("old", "new"), (delay, state)
        seen.add(state)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    # The next run removes what killed runs left (their processes are gone) and publishes.
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    assert _folder_state(out) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], leftovers
    assert "old" in seen  # the kills did land before publishing at least once


def test_two_concurrent_force_runs_both_finish_with_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    _old_folder(out)
    command, env = _force_convert_command(out)
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(), p.stderr.read().decode()) for p in runs]
    assert all(code == 0 for code, _ in results), results
    assert _folder_state(out) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publish_without_an_atomic_swap_restores_the_old_folder(tmp_path, monkeypatch):
    import navil_hf.folders as folders

    out, new = tmp_path / "out", tmp_path / f".out.tmp-{os.getpid()}-x"
    _old_folder(out)
    new.mkdir()
    (new / "config.json").write_text("{}")
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def failing_second_rename(src, dst):
        if Path(src) == new:
            raise OSError(errno.EIO, "I/O error (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="simulated"):
        publish(new, out, force=True)
    assert _folder_state(out) == "old"


def test_a_folder_killed_between_two_renames_is_restored_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    backup = tmp_path / f".out.tmp-{pid}-old-0123abcd"
    _old_folder(backup)
    stale = tmp_path / f".out.tmp-{pid}-k2j4"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a run still in progress (this process)
    live.mkdir()
    clean_stale_temporaries(out, report=sys.stdout)
    printed = capsys.readouterr().out
    assert _folder_state(out) == "old" and "restored" in printed
    assert not stale.exists() and "removed" in printed
    assert live.exists()


# ---------------------------------------------------------------------------------------------------
# 3, 4, 6. Input validated before any tensor is read; one line and exit 2 for every mistake


def test_shard_index_entries_must_name_files_inside_the_checkpoint(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    source = copy_checkpoint("qwen3", tmp_path / "ckpt")
    tensors = load_file(source / "model.safetensors")
    save_file(tensors, str(outside / "x.safetensors"), metadata={"format": "pt"})
    (source / "model.safetensors").unlink()
    for entry in ("../outside/x.safetensors", str(outside / "x.safetensors"), "/etc/passwd", "../../../../etc/passwd"):
        index = {"metadata": {}, "weight_map": {key: entry for key in tensors}}
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
        err = usage_error(capsys, ["convert", source, tmp_path / "out"])
        assert "model.safetensors.index.json" in err and "inside the folder" in err, err


def _one_line_cases():
    def config(edit):
        return lambda src: edit_json(src / "config.json", edit)

    return {
        "full-attention indexes as a string": (
            config(lambda c: c["vision_config"].update(fullatt_block_indexes="2")),
            "vision_config.fullatt_block_indexes",
        ),
        "full-attention index out of range": (
            config(lambda c: c["vision_config"].update(fullatt_block_indexes=[7])),
            "vision_config.fullatt_block_indexes",
        ),
        "downsample ratio 0": (config(lambda c: c.update(downsample_ratio=0)), "downsample_ratio"),
        "unknown activation": (config(lambda c: c["llm_config"].update(hidden_act="bogus")), "llm_config.hidden_act"),
        "negative hidden size": (config(lambda c: c["llm_config"].update(hidden_size=-8)), "llm_config.hidden_size"),
        "heads as a float": (
            config(lambda c: c["vision_config"].update(num_attention_heads=2.5)),
            "vision_config.num_attention_heads",
        ),
        "min patches over max": (
            config(lambda c: c.update(min_dynamic_patch=10, max_dynamic_patch=2)),
            "min_dynamic_patch",
        ),
        "vocabulary smaller than the tokenizer's ids": (
            config(lambda c: c["llm_config"].update(vocab_size=8)),
            "vocab_size",
        ),
        "config is a list": (lambda src: (src / "config.json").write_text("[1, 2]"), "config.json"),
        "truncated safetensors": (
            lambda src: (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:200]),
            "model.safetensors",
        ),
        "garbage safetensors": (lambda src: (src / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors"),
        "broken shard index": (
            lambda src: (src / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
            "model.safetensors.index.json",
        ),
        "no tokenizer files": (
            lambda src: [(src / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
            "tokenizer",
        ),
    }


@pytest.mark.parametrize("case", list(_one_line_cases()))
def test_broken_checkpoints_end_in_one_line(tmp_path, capsys, case):
    damage, fragment = _one_line_cases()[case]
    source = copy_checkpoint("qwen3", tmp_path / "ckpt")
    damage(source)
    err = usage_error(capsys, ["convert", "-q", source, tmp_path / "out"])
    assert fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tmp_path, capsys, bad):
    source = copy_checkpoint("qwen3", tmp_path / "ckpt")
    tensors = load_file(source / "model.safetensors")
    key = sorted(tensors)[3]
    tensors[key].view(-1)[0] = bad
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    err = usage_error(capsys, ["convert", "-q", source, tmp_path / "out"])
    assert key in err and "NaN or infinite" in err, err


def test_chat_on_an_unconverted_checkpoint_says_convert_it(capsys):
    err = usage_error(capsys, ["chat", "--model", checkpoint("qwen3"), "hi"])
    assert "original NaViL checkpoint" in err and "navil convert" in err


def test_a_converted_folder_whose_token_ids_exceed_the_vocabulary_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert navil(["convert", "--no-verify", "-q", str(checkpoint("qwen3")), str(out)]) == 0
    vocab = json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]
    edit_json(out / "config.json", lambda c: c.update(image_token_id=vocab + 5))
    err = usage_error(capsys, ["chat", "--model", out, "hi"])
    assert "image_token_id" in err and "outside the vocabulary" in err


def test_internal_errors_are_one_line_with_exit_1_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("something internal")

    monkeypatch.setattr("navil_hf.conversion.convert._convert", boom)
    assert navil(["convert", str(checkpoint("qwen3")), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "--debug" in err, err
    with pytest.raises(KeyError):
        navil(["--debug", "convert", str(checkpoint("qwen3")), str(tmp_path / "out")])


def test_init_from_llm_option_mistakes_fail_before_loading(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the options were checked")

    monkeypatch.setattr("navil_hf.conversion.init_llm.load_source", never)
    source = tmp_path / "llm"
    source.mkdir()
    out = tmp_path / "out"
    err = usage_error(capsys, ["init-from-llm", source, out, "--min-dynamic-patch", 9, "--max-dynamic-patch", 4])
    assert "--min-dynamic-patch (9) is larger than --max-dynamic-patch (4)" in err
    err = usage_error(capsys, ["init-from-llm", source, out, "--chat-template", "no-such-template"])
    assert "no such file nor template name" in err
    assert "unknown vision preset" in usage_error(capsys, ["init-from-llm", source, out, "--vision-preset", "huge"])


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF" + b"\x00" * 60])
def test_a_broken_gguf_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    err = usage_error(capsys, ["init-from-llm", path, tmp_path / "out", "-q"])
    assert "model.gguf" in err and "GGUF" in err
