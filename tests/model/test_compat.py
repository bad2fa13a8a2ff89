"""The compatibility layer (compat_navil.py): the floor, the cache's names, the mask helper."""

import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

import compat_navil

from conftest import REPO_ROOT


def test_floor_is_refused_with_one_line_naming_it():
    code = "import transformers; transformers.__version__ = '5.10.4'; import compat_navil"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        "compat_navil.UnsupportedTransformersError: NaViL needs transformers>=5.16.1, found 5.10.4: "
        "pip install -U 'transformers>=5.16.1'"
    )


@pytest.mark.parametrize(
    "version, release", [("5.24.0", (5, 24, 0)), ("5.25.0.dev0", (5, 25, 0)), ("5.3.0rc1", (5, 3, 0))]
)
def test_release_parsing(version, release):
    assert compat_navil._release(version) == release


def test_cache_names_follow_the_installed_transformers():
    import inspect

    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert compat_navil.CACHE_KWARG == ("cache" if "cache" in params else "past_key_values")
    output = compat_navil.cache_field("x")
    assert list(output) == [compat_navil.CACHE_FIELD]


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_pop_cache_takes_either_name_once():
    cache = DynamicCache()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "other": 1}
        assert compat_navil.pop_cache(kwargs) is cache and kwargs == {"other": 1}
    assert compat_navil.pop_cache({}, None, cache) is cache
    assert compat_navil.pop_cache({"cache": cache}, cache) is cache  # the same cache twice is fine
    with pytest.raises(ValueError, match="pass the cache once"):
        compat_navil.pop_cache({"past_key_values": DynamicCache()}, cache)


def test_old_cache_name_warns_where_transformers_renamed_it(recwarn):
    compat_navil.pop_cache({"past_key_values": DynamicCache()})
    warned = any("`past_key_values` is deprecated" in str(w.message) for w in recwarn.list)
    assert warned == (compat_navil.CACHE_KWARG == "cache")


def test_causal_mask_wrapper_passes_prepared_masks_through():
    prepared = torch.zeros(1, 1, 3, 3)
    assert compat_navil.create_causal_mask(None, None, {"full_attention": prepared}, None, None) is prepared


def test_unknown_rope_type_is_named():
    from configuration_navil import NaViLTextConfig

    config = NaViLTextConfig(
        hidden_size=32, num_attention_heads=4, rope_parameters={"rope_type": "nope", "rope_theta": 1.0}
    )
    with pytest.raises(ValueError, match="unknown rope_type 'nope'"):
        compat_navil.rope_inv_freq(config, "cpu")


def test_hub_kernels_on_or_off_compute_the_same_on_cpu(monkeypatch, qwen3_folder):
    """transformers 5.25 turns hub kernels on by default (`from_pretrained(use_kernels=None)`): they would
    replace NaViL's GELU (vision) and SiLU (LLM) activations, on CUDA/ROCm/XPU only. On CPU a converted
    folder loads without touching the network and computes the same logits and greedy tokens with kernels
    at the default, on where the `kernels` package is installed, and off."""
    import importlib.util
    import socket

    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from conftest import fixtures_dir

    source = fixtures_dir() / "original-qwen3-tiny"
    folder = qwen3_folder
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(source / "image0.png").convert("RGB").resize((48, 32))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    connections = []

    def no_network(sock, address):
        connections.append(address)
        raise OSError(f"this test allows no network connection (to {address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    settings = {"default": {}, "off": {"use_kernels": False}}
    if importlib.util.find_spec("kernels") is not None:
        settings["on"] = {"use_kernels": True}
    results = {}
    for name, kwargs in settings.items():
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        results[name] = logits, tokens
    assert connections == []
    logits_off, tokens_off = results["off"]
    for name, (logits, tokens) in results.items():
        torch.testing.assert_close(logits, logits_off, rtol=0, atol=0, msg=f"kernels {name} vs off")
        assert tokens.tolist() == tokens_off.tolist(), name
