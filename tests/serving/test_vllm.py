"""NaViL served by vLLM (navil_hf/vllm) equals our transformers model.

Runs only where vLLM is importable (its own venv: it pins torch and transformers; see .ci/run). Tiny converted
folders of both LLM families (tests/vllm_tiny.py, head_dim 64 for vLLM's CPU attention); the engine runs in
a subprocess (tests/vllm_worker.py), the transformers reference in this process (tests/vllm_reference.py).

* greedy token ids equal and logprobs within 1e-4, for one batch mixing text-only prompts, a prompt with two
  images (multi-scale) and prompts whose answer contains generated special tokens (`<box>` is biased to be
  generated; it must take the plain embedding, SPEC §8.3) -- with chunked prefill forced
  (`max_num_batched_tokens` smaller than a prompt, so image blocks are split across steps and prefill chunks
  share steps with decodes), then the same batch again, served from the prefix cache;
* a model without visual experts (`visual_experts: false`: every token through the text layers) serves the
  same batch with the transformers model's greedy tokens and logprobs;
* `vllm serve FOLDER` answers OpenAI chat completions with `image_url` content (a data URL and a local file),
  streaming too, with what the transformers model answers.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: the vLLM helpers
sys.path.insert(0, HERE)

from vllm_reference import load, reference  # noqa: E402
from vllm_tiny import build_folder, sample_images  # noqa: E402

BOX = 14  # <box> in the fixtures' tokenizer
MAX_TOKENS = 16
ENGINE_TIMEOUT = int(os.environ.get("NAVIL_VLLM_TIMEOUT", "1200"))


def engine_env():
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the RAM
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("navil_vllm")
    images = []
    for i, image in enumerate(sample_images()):
        path = root / f"image{i}.png"
        image.save(path)
        images.append(str(path))
    return root, images


def chat(user):
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def requests_for(images):
    return [
        {"prompt": chat("<image>\n<image>\nDescribe the two images."), "images": [images[0], images[2]]},
        {"prompt": chat("Hello! How are you?"), "images": []},
        {"prompt": chat("Where is the <ref>cat</ref>? <box>1</box>"), "images": []},  # table in the prompt
        {"prompt": chat("<image>\nWhich is brighter?"), "images": [images[3]]},
        {"prompt": chat("<image>\nA red square."), "images": [images[1]]},
    ]


def run_worker(spec, root, name):
    spec_path, out_path = root / f"{name}.json", root / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "vllm_worker.py"), str(spec_path), str(out_path)],
        env=engine_env(),
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out_path.read_text())


def assert_same(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["prompt_token_ids"] == w["prompt_token_ids"], f"request {i}: prompt token ids differ"
        assert g["token_ids"] == w["token_ids"], f"request {i}: {g['token_ids']} != {w['token_ids']}"
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True))
        assert diff < 1e-4, f"request {i}: logprobs differ by {diff}"


@pytest.mark.parametrize("family", ["qwen3", "internlm2"])
def test_vllm_greedy_equals_transformers(workdir, family):
    root, images = workdir
    folder = build_folder(family, str(root / family))
    requests = requests_for(images)
    want = reference(folder, requests, MAX_TOKENS)
    # The tiny models are built so that the rules under test matter for these requests.
    assert any(BOX in r["token_ids"] for r in want), "no generated <box>: the prompt-only rule is not exercised"
    everywhere = reference(folder, requests, MAX_TOKENS, special_token_table="everywhere")
    assert any(a["token_ids"] != b["token_ids"] for a, b in zip(want, everywhere))

    spec = {
        "model": folder,
        "requests": requests,
        "max_tokens": MAX_TOKENS,
        "repeat": 2,  # the second pass reads the prompts' KV from the prefix cache
        "engine": {"max_num_batched_tokens": 32, "enable_prefix_caching": True, "max_num_seqs": 8},
    }
    out = run_worker(spec, root, family)
    first, cached = out["results"]
    assert_same(first, want)
    assert_same(cached, want)


def test_vllm_without_visual_experts_equals_transformers(workdir):
    root, images = workdir
    folder = build_folder("qwen3", str(root / "qwen3-no-experts"), visual_experts=False)
    requests = requests_for(images)
    want = reference(folder, requests, MAX_TOKENS)
    spec = {
        "model": folder,
        "requests": requests,
        "max_tokens": MAX_TOKENS,
        "engine": {"max_num_batched_tokens": 32, "max_num_seqs": 8},
    }
    (first,) = run_worker(spec, root, "qwen3-no-experts")["results"]
    assert_same(first, want)


# ------------------------------------------------------------------------------------------ serving


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, timeout):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError("vllm serve did not become ready")


def test_vllm_serve_openai_chat(workdir):
    from openai import OpenAI

    root, images = workdir
    folder = build_folder("qwen3", str(root / "serve-qwen3"))
    port = free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "navil_hf.vllm.serve", folder, "--host", "127.0.0.1", "--port",
         str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
         "--allowed-local-media-path", str(root)],
        env=engine_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(proc, port, ENGINE_TIMEOUT)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with open(images[0], "rb") as f:
            data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": {"url": "file://" + images[2]}},
            {"type": "text", "text": "Describe the two images."},
        ]
        messages = [{"role": "user", "content": content}]
        kwargs = dict(model=folder, messages=messages, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
        answer = client.chat.completions.create(**kwargs).choices[0].message.content
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(stream=True, **kwargs)
            if chunk.choices
        )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    processor, model = load(folder)
    hf_messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": content[2]["text"]}],
        }
    ]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    want = reference(folder, [{"prompt": prompt, "images": [images[0], images[2]]}], 8, loaded=(processor, model))
    text = processor.tokenizer.decode(want[0]["token_ids"], skip_special_tokens=True)
    assert answer == text
    assert streamed == answer


def test_vllm_image_ids_are_the_processors():
    """vLLM's prompt update for an image is `image_tokens` with the config's ids: the processor's ids."""
    from transformers import AutoTokenizer

    from image_processing_navil import IMAGE_LAYOUT_TOKENS
    from navil_hf.vllm import model as vllm_model
    from processing_navil import IMAGE_PLACEHOLDER, NaViLProcessor

    from conftest import checkpoint

    processor = NaViLProcessor(tokenizer=AutoTokenizer.from_pretrained(checkpoint("qwen3")))
    names = ("start", "context", "line", "frame", "end")
    ids = dict(zip(names, processor.tokenizer.convert_tokens_to_ids(list(IMAGE_LAYOUT_TOKENS)), strict=True))
    inputs = processor(text=IMAGE_PLACEHOLDER, images=sample_images()[:1])
    assert vllm_model.image_expansion_ids(inputs["image_grid_thw"].tolist(), ids, 2) == inputs["input_ids"][0]
    assert vllm_model.IMAGE_PLACEHOLDER is IMAGE_PLACEHOLDER
