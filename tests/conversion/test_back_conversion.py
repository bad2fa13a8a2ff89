"""Back-conversion (`navil to-original`): our config -> the original config.json (round trips
field by field), and original -> `navil convert` -> `navil to-original` -> every original tensor
bit for bit, for both fixtures; the folded InternLM2 refusal and `--approximate`; errors."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from configuration_navil import SPECIAL_TOKENS
from navil_hf.cli import main as navil
from navil_hf.conversion import back as back_module
from navil_hf.conversion.back import convert_to_original
from navil_hf.conversion.convert import convert_checkpoint
from navil_hf.conversion.original import (
    EXTRAS_KEY,
    INTERNLM2,
    QWEN3,
    convert_config,
    is_boilerplate,
    load_original_config,
    load_original_state_dict,
    significant_config,
    to_original_config,
)
from navil_hf.errors import ConversionError, VerificationError

from conftest import FIXTURES, checkpoint, token_ids, usage_error
from tiny import tiny_config, tiny_model, write_hub_folder

TOKEN_IDS = token_ids()


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
        expected = {"attn_implementation": "eager", "skip_final_norm_weight": False, "use_cache": True}
        assert extras["llm_config"] == expected
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


# ---------------------------------------------------------------------------------------------------
# Weights, end to end through the command line


def navil_ok(argv, capsys=None):
    code = navil([*argv, "--quiet"])
    assert code == 0, capsys.readouterr().err if capsys else code


def assert_same_tensors(got, expected):
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module", params=FIXTURES)
def round_trip(request, tmp_path_factory):
    """original -> navil convert -> navil to-original -> navil convert again."""
    name, root = request.param, tmp_path_factory.mktemp(request.param)
    ours, back, again = root / "hub", root / "original", root / "hub-again"
    navil_ok(["convert", str(checkpoint(name)), str(ours)])
    navil_ok(["to-original", str(ours), str(back)])
    navil_ok(["convert", str(back), str(again)])
    return dict(name=name, ours=ours, back=back, again=again)


def test_back_converted_tensors_equal_the_original_bit_for_bit(round_trip):
    written = load_file(round_trip["back"] / "model.safetensors")
    assert_same_tensors(written, load_file(checkpoint(round_trip["name"]) / "model.safetensors"))


def test_back_converted_config_round_trips(round_trip):
    original = load_original_config(checkpoint(round_trip["name"]))
    written = json.loads((round_trip["back"] / "config.json").read_text())
    assert significant_config(written) == significant_config(original)
    assert set(written) == set(significant_config(original))


def test_back_converted_folder_holds_tokenizer_and_readme(round_trip):
    from transformers import AutoTokenizer

    back = round_trip["back"]
    files = {p.name for p in back.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert not files & {"modeling_navil.py", "configuration_navil.py", "processor_config.json"}
    assert "original code files" in (back / "README.md").read_text()
    tokenizer_config = json.loads((back / "tokenizer_config.json").read_text())
    # loadable by the original code's transformers 4.x: its class name, no pointer to our processor code
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "auto_map" not in tokenizer_config and "processor_class" not in tokenizer_config
    assert "<IMG_CONTEXT>" in tokenizer_config["additional_special_tokens"]
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)
    original = AutoTokenizer.from_pretrained(checkpoint(round_trip["name"]))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> hello<|im_end|>"
    assert AutoTokenizer.from_pretrained(back).encode(text) == original.encode(text)


def test_forward_conversion_of_the_back_converted_folder_is_identical(round_trip):
    again, ours = (load_file(round_trip[k] / "model.safetensors") for k in ("again", "ours"))
    assert_same_tensors(again, ours)
    first = json.loads((round_trip["ours"] / "config.json").read_text())
    second = json.loads((round_trip["again"] / "config.json").read_text())
    assert second == first
    assert first["text_config"]["chain_visual_output"] is (round_trip["name"] == "internlm2")


def test_back_conversion_reports_its_checks(tmp_path, capsys):
    ours = tmp_path / "hub"
    navil_ok(["convert", str(checkpoint("internlm2")), str(ours)])
    assert navil(["to-original", str(ours), str(tmp_path / "original"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'original'} in the original layout (72 tensors from 80, float32)" in printed
    for check in ("original layout", "forward again", "config", "tokenizer"):
        assert f"verified {check}:" in printed
    assert "bit for bit" in printed and "approximate" not in printed


def test_bfloat16_sharded_tied_folder(tmp_path):
    """A bfloat16 conversion of a tied checkpoint without LM head goes back in bfloat16, sharded on request."""
    source = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3"), source)
    for path in source.iterdir():
        path.chmod(0o644)
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    (source / "config.json").write_text(json.dumps(config))
    tensors = load_file(source / "model.safetensors")
    del tensors["language_model.lm_head.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})

    ours, back = tmp_path / "hub", tmp_path / "original"
    convert_checkpoint(source, ours, dtype="bfloat16")
    result = convert_to_original(ours, back, progress=False, max_shard_size="200KB")
    assert result.dtype == torch.bfloat16 and result.config["torch_dtype"] == "bfloat16"
    assert (back / "model.safetensors.index.json").is_file() and len(list(back.glob("model-*.safetensors"))) > 1
    written = load_original_state_dict(back)
    assert_same_tensors(written, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    assert json.loads((back / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is True


# ---------------------------------------------------------------------------------------------------
# Folded InternLM2 (--fold-visual-output): refused, or approximately unfolded on request


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    out = tmp_path_factory.mktemp("folded") / "hub"
    navil_ok(["convert", str(checkpoint("internlm2")), str(out), "--fold-visual-output"])
    return out


def test_folded_folder_is_refused_without_approximate(folded, tmp_path, capsys):
    assert json.loads((folded / "config.json").read_text())["text_config"]["chain_visual_output"] is False
    err = usage_error(capsys, ["to-original", str(folded), str(tmp_path / "original")])
    assert "folded" in err and "wo_ve cannot be recovered exactly" in err and "--approximate" in err
    assert not (tmp_path / "original").exists()


def test_folded_folder_with_approximate(folded, tmp_path, capsys):
    back = tmp_path / "original"
    assert navil(["to-original", str(folded), str(back), "--approximate", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "approximate: wo_ve recovered by least squares" in printed and "max-abs error" in printed
    for verify in (True, False):  # the error is measured either way
        out = tmp_path / f"again-{verify}"
        result = convert_to_original(folded, out, progress=False, approximate=True, verify=verify)
        assert result.approximate and 0 <= result.approximation_error < 1e-5
    written, original = load_file(back / "model.safetensors"), load_file(checkpoint("internlm2") / "model.safetensors")
    assert set(written) == set(original)
    for key, tensor in original.items():
        if ".wo_ve." in key:
            torch.testing.assert_close(written[key], tensor, atol=1e-4, rtol=1e-4)
        else:
            assert torch.equal(written[key], tensor), key


# ---------------------------------------------------------------------------------------------------
# Errors (exit code 2, one line, nothing written)


def test_errors(tmp_path, capsys, round_trip):
    ours, out = str(round_trip["ours"]), str(tmp_path / "out")
    original = str(checkpoint("qwen3"))
    usage_error(capsys, ["to-original", original, out], "already in the original layout")
    empty = str(tmp_path)
    usage_error(capsys, ["to-original", empty, out], "has no config.json", "not a converted")
    usage_error(capsys, ["to-original", str(tmp_path / "nowhere"), out], "is not a directory")
    usage_error(capsys, ["to-original", ours, str(round_trip["back"])], "already exists", "--force")
    usage_error(capsys, ["to-original", ours, ours, "--force"], "is the source", "outside it")
    usage_error(capsys, ["convert", str(checkpoint("qwen3")), out, "--approximate"], "--to-original only")
    code = navil(["convert", "--to-original", ours, out, "--fold-visual-output", "--dtype", "float16"])  # deprecated
    deprecation, error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and deprecation.startswith("navil convert --to-original is deprecated; use navil to-original")
    assert "--fold-visual-output, --dtype cannot be combined with --to-original" in error
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(round_trip["ours"] / "config.json", no_weights)
    usage_error(capsys, ["to-original", str(no_weights), out], "has no model.safetensors")
    assert not (tmp_path / "out").exists()


def test_a_model_without_visual_experts_is_refused(tmp_path, capsys):
    """The original layout gives every decoder layer visual experts: a folder without them (and its config)
    is refused with one line, nothing written."""
    folder = write_hub_folder(tiny_model(visual_experts=False), tmp_path / "no-experts")
    out = tmp_path / "out"
    capsys.readouterr()  # save_pretrained's progress bar
    usage_error(capsys, ["to-original", str(folder), str(out)], "has no visual experts", "no layout for this model")
    assert not out.exists()
    with pytest.raises(ConversionError, match="visual_experts is false"):
        to_original_config(tiny_config(visual_experts=False))


def test_force_replaces_and_failed_verification_writes_nothing(tmp_path, monkeypatch, round_trip):
    out = tmp_path / "original"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "navil_chat"}')  # an original-layout folder: replaceable
    (out / "stale.txt").write_text("old")
    convert_to_original(round_trip["ours"], out, force=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()

    real = back_module._write_weights

    def tamper(folder, tensors, *args):
        def changed():
            for index, (key, tensor) in enumerate(tensors):
                yield key, (tensor + 1 if index == 0 else tensor)

        return real(folder, changed(), *args)

    monkeypatch.setattr(back_module, "_write_weights", tamper)
    target = tmp_path / "tampered"
    with pytest.raises(VerificationError, match="bit for bit"):
        convert_to_original(round_trip["ours"], target, progress=False)
    assert not target.exists() and not list(tmp_path.glob(".tampered.tmp-*"))
