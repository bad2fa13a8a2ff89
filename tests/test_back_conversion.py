"""Back-conversion (`navil convert --to-original`): our config -> the original config.json (round trips
field by field), and original -> `navil convert` -> `navil convert --to-original` -> every original tensor
bit for bit, for both fixtures; the folded InternLM2 refusal and `--approximate`; errors."""

import copy
import json

import pytest
from conftest import fixtures_dir
from tiny import tiny_config

from configuration_navil import SPECIAL_TOKENS
from conversion.errors import ConversionError
from conversion.original import (
    EXTRAS_KEY,
    INTERNLM2,
    QWEN3,
    convert_config,
    is_boilerplate,
    load_original_config,
    significant_config,
    to_original_config,
)

FIXTURES = {"qwen3": "original-qwen3-tiny", "internlm2": "original-internlm2-tiny"}
TOKEN_IDS = {t: i for i, t in enumerate(("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *SPECIAL_TOKENS))}


def checkpoint(name):
    return fixtures_dir() / FIXTURES[name] / "checkpoint"


def without_volatile(config):
    d = config.to_dict()
    d.pop("transformers_version", None)
    return d


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_config_round_trips(name):
    """original -> ours -> original gives every non-boilerplate key back with its value (and nothing
    else); ours -> original -> ours gives an identical config."""
    original = load_original_config(checkpoint(name))
    ours = convert_config(original, TOKEN_IDS)
    back = to_original_config(ours, torch_dtype="float32")
    assert significant_config(back) == significant_config(original)
    assert set(back) == set(significant_config(original))  # nothing added, no boilerplate written
    again = convert_config(back, TOKEN_IDS)
    assert without_volatile(again) == without_volatile(ours)
    assert to_original_config(again, torch_dtype="float32") == back


@pytest.mark.parametrize("name", FIXTURES)
def test_unmapped_keys_are_carried_verbatim(name):
    original = load_original_config(checkpoint(name))
    extras = convert_config(original, TOKEN_IDS).original_config_extras
    assert extras["force_image_size"] == 32 and extras["ps_version"] == "v1" and extras["select_layer"] == -1
    assert extras["vision_config"]["use_flash_attn"] is False and extras["vision_config"]["image_size"] == 32
    if name == "internlm2":
        assert extras["llm_config"] == {"attn_implementation": "eager", "skip_final_norm_weight": False, "use_cache": True}
    else:
        assert extras["llm_config"]["sliding_window"] == 4096 and extras["llm_config"]["use_sliding_window"] is False
    mapped = {"hidden_size", "num_hidden_layers", "vocab_size", "template", "rope_theta", "bias", "attention_bias"}
    for section in (extras, extras["vision_config"], extras["llm_config"]):
        assert not mapped & set(section)
        assert not any(is_boilerplate(k, v) for k, v in section.items())


def test_boilerplate_rule():
    assert is_boilerplate("bad_words_ids", None) and is_boilerplate("num_beams", 1) and is_boilerplate("top_k", 50)
    assert is_boilerplate("id2label", {0: "LABEL_0", 1: "LABEL_1"}) and is_boilerplate("output_attentions", False)
    assert is_boilerplate("_name_or_path", "OpenGVLab/NaViL-2B") and is_boilerplate("transformers_version", "4.51.0")
    assert not is_boilerplate("num_beams", 4)  # a generic key set to something else is kept
    assert not is_boilerplate("id2label", {0: "yes", 1: "no"})
    # generic keys LLM configs give their own defaults are always kept
    assert not is_boilerplate("bos_token_id", None) and not is_boilerplate("tie_word_embeddings", True)
    assert not is_boilerplate("use_flash_attn", False) and not is_boilerplate("ps_version", "v1")


def test_non_default_generic_and_unknown_keys_round_trip():
    original = load_original_config(checkpoint("internlm2"))
    original["llm_config"].update(num_beams=4, some_new_flag=[1, 2], rope_scaling={"type": "dynamic", "factor": 2.0})
    original["vision_config"]["future_option"] = {"a": 1}
    original["auto_map"] = {"AutoConfig": "configuration_navil_chat.NaViLChatConfig"}
    original["bad_words_ids"] = None  # boilerplate: dropped
    back = to_original_config(convert_config(original, TOKEN_IDS), torch_dtype="float32")
    assert significant_config(back) == significant_config(original)
    assert back["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert "bad_words_ids" not in back


def test_qwen3_rope_scaling_round_trips():
    original = load_original_config(checkpoint("qwen3"))
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    original["llm_config"].update(rope_scaling=scaling, rope_theta=5e5, attention_bias=True)
    back = to_original_config(convert_config(original, TOKEN_IDS), torch_dtype="float32")
    assert significant_config(back) == significant_config(original)


def test_edits_of_our_config_reach_the_original():
    ours = convert_config(load_original_config(checkpoint("internlm2")), TOKEN_IDS)
    ours.max_dynamic_patch = 1024
    ours.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 2e6}
    ours.text_config.vocab_size = 400
    back = to_original_config(ours, torch_dtype="bfloat16")
    assert back["max_dynamic_patch"] == 1024 and back["torch_dtype"] == "bfloat16"
    assert back["llm_config"]["rope_theta"] == 2e6 and back["llm_config"]["vocab_size"] == 400


@pytest.mark.parametrize("qk_norm,arch", [(True, QWEN3), (False, INTERNLM2)])
def test_config_without_extras_maps_to_a_minimal_original(qk_norm, arch):
    """A config that did not come from an original checkpoint (no extras) still maps both ways."""
    ours = tiny_config(qk_norm=qk_norm, chain_visual_output=not qk_norm)
    assert getattr(ours, EXTRAS_KEY) is None
    back = to_original_config(ours)
    assert back["model_type"] == "navil_chat" and back["architectures"] == ["NaViL"]
    assert back["vision_config"]["model_type"] == "navil_vit" and back["llm_config"]["architectures"] == [arch]
    assert ("head_dim" in back["llm_config"]) is qk_norm
    token_ids = dict(zip(SPECIAL_TOKENS, ours.special_token_ids))
    token_ids.update({"<|im_start|>": 1, "<|im_end|>": 2})
    again = convert_config(copy.deepcopy(back), token_ids)
    for field in ("vision_config", "text_config"):
        assert getattr(again, field).to_dict() == getattr(ours, field).to_dict(), field
    assert (again.template, again.min_dynamic_patch, again.max_dynamic_patch) == (
        ours.template,
        ours.min_dynamic_patch,
        ours.max_dynamic_patch,
    )


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda c: setattr(c.text_config, "attention_out_bias", True), "attention_bias (False) differs"),
        (lambda c: setattr(c.text_config, "mlp_bias", True), "mlp_bias"),
        (lambda c: setattr(c.vision_config, "rope_theta", 500.0), "vision_config.rope_theta"),
        (lambda c: setattr(c.text_config, "head_dim", 8), "InternLM2 derives head_dim"),
    ],
)
def test_configs_the_original_cannot_express_are_refused(edit, fragment):
    ours = convert_config(load_original_config(checkpoint("internlm2")), TOKEN_IDS)
    edit(ours)
    with pytest.raises(ConversionError, match="cannot be written in the original NaViL layout") as info:
        to_original_config(ours)
    assert fragment in str(info.value)


def test_written_config_json_is_plain_json():
    back = to_original_config(convert_config(load_original_config(checkpoint("qwen3")), TOKEN_IDS), "float32")
    assert json.loads(json.dumps(back)) == back
