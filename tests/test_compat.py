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
