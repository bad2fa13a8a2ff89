"""Checkpoint conversion: tensor surgery, key maps (fixtures and full-size shapes on the meta device),
config mapping, errors, atomic writing and end-to-end `navil convert` of both fixtures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from configuration_navil import SPECIAL_TOKENS, NaViLTextConfig, rope_parameters_from_legacy
from modeling_navil import NaViLForConditionalGeneration
from navil_hf.cli import main as navil
from navil_hf.conversion import convert as convert_module
from navil_hf.conversion.convert import convert_checkpoint
from navil_hf.conversion.keymap import (
    KeyMismatchError,
    convert_state_dict,
    match_source,
    rules_for,
    to_original_state_dict,
)
from navil_hf.conversion.original import (
    INTERNLM2,
    QWEN3,
    check_original_state_dict,
    convert_config,
    expected_original_shapes,
    load_original_config,
    load_original_state_dict,
)
from navil_hf.conversion.surgery import (
    fold_chained_bias,
    fold_chained_projection,
    merge_internlm2_wqkv,
    split_internlm2_wqkv,
    unfold_chained_projection,
)
from navil_hf.errors import ConversionError, VerificationError

from conftest import FIXTURES, REPO_ROOT, checkpoint, copy_checkpoint, token_ids
from tiny import full_size_original_config, tiny_config

TOKEN_IDS = token_ids()


def rewrite(folder, config=None, tensors=None):
    folder = Path(folder)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Surgery


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,width", [(4, 2, 16, 64), (8, 1, 8, 32), (6, 6, 4, 24), (16, 8, 8, 40), (12, 4, 2, 5)]
)
def test_wqkv_split_merge_round_trip_is_exact(heads, kv_heads, head_dim, width):
    rows = (heads + 2 * kv_heads) * head_dim
    weight = torch.randn(rows, width)
    q, k, v = split_internlm2_wqkv(weight, heads, kv_heads, head_dim)
    assert q.shape == (heads * head_dim, width) and k.shape == v.shape == (kv_heads * head_dim, width)
    assert torch.equal(merge_internlm2_wqkv(q, k, v, heads, kv_heads, head_dim), weight)
    bias = torch.randn(rows)
    assert torch.equal(
        merge_internlm2_wqkv(*split_internlm2_wqkv(bias, heads, kv_heads, head_dim), heads, kv_heads, head_dim), bias
    )


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (8, 8), (4, 1)])
def test_wqkv_split_follows_the_kv_head_grouping(heads, kv_heads):
    """Build wqkv row block by row block as SPEC §7 describes (per KV head: its query heads, its key
    head, its value head) from known q/k/v heads and check the split returns them in head order."""
    head_dim, width, group = 3, 5, heads // kv_heads
    q_heads = [torch.full((head_dim, width), float(h)) + torch.randn(head_dim, width) for h in range(heads)]
    k_heads = [torch.full((head_dim, width), 100.0 + h) for h in range(kv_heads)]
    v_heads = [torch.full((head_dim, width), 200.0 + h) for h in range(kv_heads)]
    blocks = []
    for g in range(kv_heads):
        blocks += q_heads[g * group : (g + 1) * group] + [k_heads[g], v_heads[g]]
    q, k, v = split_internlm2_wqkv(torch.cat(blocks), heads, kv_heads, head_dim)
    assert (
        torch.equal(q, torch.cat(q_heads)) and torch.equal(k, torch.cat(k_heads)) and torch.equal(v, torch.cat(v_heads))
    )


def test_wqkv_split_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="rows"):
        split_internlm2_wqkv(torch.zeros(10, 4), 4, 2, 2)
    with pytest.raises(ValueError, match="multiple"):
        split_internlm2_wqkv(torch.zeros(14, 4), 3, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        merge_internlm2_wqkv(torch.zeros(8, 4), torch.zeros(4, 4), torch.zeros(4, 3), 4, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fold_equals_chained_application(dtype):
    torch.manual_seed(0)
    first, second = torch.randn(24, 16, dtype=dtype), torch.randn(16, 24, dtype=dtype)
    b1, b2 = torch.randn(24, dtype=dtype), torch.randn(16, dtype=dtype)
    x = torch.randn(7, 16, dtype=torch.float64)
    folded, folded_bias = fold_chained_projection(first, second), fold_chained_bias(b1, second, b2)
    assert folded.dtype == folded_bias.dtype == dtype
    chained = (x @ first.double().T + b1.double()) @ second.double().T + b2.double()
    one = x @ folded.double().T + folded_bias.double()
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.3, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(one, chained, atol=tol, rtol=tol)


def test_fold_is_computed_in_float64():
    torch.manual_seed(0)
    first, second = torch.randn(64, 64), torch.randn(64, 64)
    assert torch.equal(fold_chained_projection(first, second), (second.double() @ first.double()).float())


def test_unfold_recovers_the_second_projection():
    torch.manual_seed(0)
    first = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].float()  # well conditioned
    second = torch.randn(32, 32)
    recovered = unfold_chained_projection(fold_chained_projection(first, second), first)
    torch.testing.assert_close(recovered, second, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Key maps on the fixtures


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_key_is_matched_by_exactly_one_rule(name, fold):
    config = load_original_config(checkpoint(name))
    rules = rules_for(config["llm_config"]["architectures"][0], fold_visual_output=fold)
    for key in load_file(checkpoint(name) / "model.safetensors"):
        matching = [rule for rule in rules if rule.source_pattern.fullmatch(key)]
        assert len(matching) == 1, (key, matching)


@pytest.mark.parametrize("name,fold", [("qwen3", False), ("internlm2", False), ("internlm2", True)])
def test_fixture_converts_to_the_model_layout_and_back(name, fold):
    original_config = load_original_config(checkpoint(name))
    arch = original_config["llm_config"]["architectures"][0]
    original = load_original_state_dict(checkpoint(name))
    config = convert_config(original_config, TOKEN_IDS, fold_visual_output=fold)
    assert config.text_config.chain_visual_output is (name == "internlm2" and not fold)
    converted = convert_state_dict(original, arch, config.text_config)
    with torch.device("meta"):
        model = NaViLForConditionalGeneration(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert not any(k.startswith("model.language_model.embed_tokens") and "special" in k for k in converted)
    assert torch.equal(converted["model.special_token_embedding.weight"], original["special_token_embedding.weight"])

    back, not_reproduced = to_original_state_dict(converted, arch, config.text_config, exact_only=True)
    folded = {f"language_model.model.layers.{n}.attention.wo_ve.weight" for n in range(2)} if fold else set()
    assert set(not_reproduced) == folded
    assert set(back) | folded == set(original)
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key


def test_internlm2_visual_output_is_kept_chained_by_default():
    original = load_original_state_dict(checkpoint("internlm2"))
    config = convert_config(load_original_config(checkpoint("internlm2")), TOKEN_IDS)
    converted = convert_state_dict(original, INTERNLM2, config.text_config)
    for n in range(2):
        wo_ve = original[f"language_model.model.layers.{n}.attention.wo_ve.weight"]
        assert torch.equal(converted[f"model.language_model.layers.{n}.self_attn.o_proj_ve.weight"], wo_ve)
        assert wo_ve.shape == (64, 64)  # hidden -> hidden


def test_internlm2_fold_matches_the_chained_original_projection():
    original = load_original_state_dict(checkpoint("internlm2"))
    config = convert_config(load_original_config(checkpoint("internlm2")), TOKEN_IDS, fold_visual_output=True)
    converted = convert_state_dict(original, INTERNLM2, config.text_config)
    x = torch.randn(5, 64, dtype=torch.float64)
    for n in range(2):
        wo = original[f"language_model.model.layers.{n}.attention.wo.weight"].double()
        wo_ve = original[f"language_model.model.layers.{n}.attention.wo_ve.weight"].double()
        ours = converted[f"model.language_model.layers.{n}.self_attn.o_proj_ve.weight"].double()
        torch.testing.assert_close(x @ ours.T, (x @ wo.T) @ wo_ve.T, atol=1e-5, rtol=1e-5)
        assert torch.equal(converted[f"model.language_model.layers.{n}.self_attn.o_proj.weight"], wo.float())
    # the approximate inverse gets wo_ve back closely
    approx, _ = to_original_state_dict(converted, INTERNLM2, config.text_config)
    diff = (
        approx["language_model.model.layers.0.attention.wo_ve.weight"]
        - original["language_model.model.layers.0.attention.wo_ve.weight"]
    )
    assert diff.abs().max() < 1e-3


def test_unmatched_keys_are_listed():
    original = load_original_state_dict(checkpoint("qwen3"))
    config = convert_config(load_original_config(checkpoint("qwen3")), TOKEN_IDS)
    original["vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"unexpected keys.*vision_model\.extra\.weight"):
        convert_state_dict(original, QWEN3, config.text_config)


def test_unknown_llm_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"'LlamaForCausalLM'.*Qwen3VEForCausalLM.*InternLM2VEForCausalLM"):
        rules_for("LlamaForCausalLM")


# ---------------------------------------------------------------------------------------------------
# Config mapping


@pytest.mark.parametrize("name", FIXTURES)
def test_config_mapping_of_the_fixtures(name):
    original = load_original_config(checkpoint(name))
    config = convert_config(original, TOKEN_IDS)
    vc, llm = original["vision_config"], original["llm_config"]
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                  "qkv_bias", "qk_normalization", "norm_type", "layer_norm_eps", "fullatt_block_indexes", "window_size"):  # fmt: skip
        assert getattr(config.vision_config, field) == vc[field], field
    assert config.vision_config.spatial_merge_size == 2
    text = config.text_config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):  # fmt: skip
        assert getattr(text, field) == llm[field], field
    assert text.head_dim == 16
    assert text.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert text.qk_norm is (name == "qwen3")
    assert text.attention_bias is text.attention_out_bias is False
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        llm["bos_token_id"],
        llm["eos_token_id"],
        llm["pad_token_id"],
    )
    assert config.template == original["template"]
    assert (config.min_dynamic_patch, config.max_dynamic_patch) == (4, 256)
    assert config.scale_downsample_ratio == 0.7071 and config.downsample_ratio == 0.5
    assert config.special_token_ids == [TOKEN_IDS[t] for t in SPECIAL_TOKENS]
    assert config.image_token_id == TOKEN_IDS["<IMG_CONTEXT>"]
    assert config.image_start_token_id == TOKEN_IDS["<img>"] and config.image_end_token_id == TOKEN_IDS["</img>"]
    assert config.image_line_break_token_id == TOKEN_IDS["<IMG_LINE_BREAK>"]
    assert config.image_frame_break_token_id == TOKEN_IDS["<IMG_FRAME_BREAK>"]
    assert config.architectures == ["NaViLForConditionalGeneration"]


def test_config_mapping_of_rope_scaling_bias_and_head_dim():
    original = load_original_config(checkpoint("internlm2"))
    original["llm_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=50000, bias=True)
    text = convert_config(original, TOKEN_IDS).text_config
    assert text.rope_parameters == {"rope_type": "dynamic", "rope_theta": 50000.0, "factor": 2.0}
    assert text.attention_bias and text.attention_out_bias and text.head_dim == 64 // 4


@pytest.mark.parametrize(
    "theta, scaling, expected",
    [
        (None, None, {"rope_type": "default", "rope_theta": 10000.0}),
        (5e5, {}, {"rope_type": "default", "rope_theta": 5e5}),
        (1e4, {"type": "linear", "factor": 4.0}, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
        (
            1e4,
            {"rope_type": "yarn", "type": "yarn", "factor": 2.0},
            {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
        ),
    ],
)
def test_legacy_rope_settings_translate_one_way_everywhere(theta, scaling, expected):
    # One translation serves the original configs, InternLM2 LLMs and NaViLTextConfig's legacy kwargs.
    assert rope_parameters_from_legacy(theta, scaling) == expected
    config = NaViLTextConfig(rope_theta=theta, rope_scaling=scaling).rope_parameters
    assert config.items() >= expected.items()  # transformers may add its defaults (yarn's original length)


# ---------------------------------------------------------------------------------------------------
# Full-size layouts on the meta device


def meta_state_dict(shapes):
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize(
    "llm,overrides,vision",
    [
        ("internlm2", {}, {}),
        ("qwen3", {}, {}),
        ("internlm2", {"bias": True, "num_key_value_heads": 4}, {"norm_type": "layer_norm"}),
        ("qwen3", {"attention_bias": True}, {"qk_normalization": True, "qkv_bias": False}),
    ],
)
def test_full_size_key_map_on_meta_tensors(llm, overrides, vision, fold):
    original = full_size_original_config(llm, **overrides)
    original["vision_config"].update(vision)
    arch = original["llm_config"]["architectures"][0]
    config = convert_config(original, TOKEN_IDS, fold_visual_output=fold)
    shapes = expected_original_shapes(original)
    check_original_state_dict(shapes, original)
    converted = convert_state_dict(meta_state_dict(shapes), arch, config.text_config)
    with torch.device("meta"):
        model = NaViLForConditionalGeneration(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    back, folded = to_original_state_dict(converted, arch, config.text_config, exact_only=True)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: s for k, s in shapes.items() if k not in folded}
    if arch == INTERNLM2 and fold:
        assert len(folded) == original["llm_config"]["num_hidden_layers"] * (2 if overrides.get("bias") else 1)
    else:
        assert folded == []


def test_tied_checkpoint_without_lm_head_is_accepted_on_meta():
    original = full_size_original_config("qwen3", tie_word_embeddings=True)
    shapes = expected_original_shapes(original)
    del shapes["language_model.lm_head.weight"]
    check_original_state_dict(shapes, original)
    original["llm_config"]["tie_word_embeddings"] = False
    with pytest.raises(KeyMismatchError, match=r"missing keys \(1\): language_model\.lm_head\.weight"):
        check_original_state_dict(shapes, original)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_weights_are_what_the_model_declares(tied):
    """One rule for the weights a folder leaves out (writing, verifying, the push check), read from the model
    on the meta device: the LM head when the config ties it, nothing otherwise."""
    from navil_hf.hub import meta_model, tied_weight_keys

    config = tiny_config(tie_word_embeddings=tied)
    assert config.tie_word_embeddings is tied
    assert tied_weight_keys(meta_model(config, torch.float32)) == ({"lm_head.weight"} if tied else set())


def test_shape_check_lists_missing_unexpected_and_misshapen_keys():
    original = full_size_original_config("internlm2")
    shapes = expected_original_shapes(original)
    del shapes["mlp1.1.weight"]
    shapes["language_model.model.layers.3.attention.wq.weight"] = (2048, 2048)
    shapes["special_token_embedding.weight"] = (13, 2048)
    shapes["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = (64,)  # dropped, allowed
    with pytest.raises(KeyMismatchError) as info:
        check_original_state_dict(shapes, original)
    message = str(info.value)
    assert "missing keys (1): mlp1.1.weight" in message
    assert "unexpected keys (1): language_model.model.layers.3.attention.wq.weight" in message
    assert "special_token_embedding.weight (13, 2048) (config implies (12, 2048))" in message
    assert "inv_freq" not in message


def test_dropped_buffers_match_a_drop_rule():
    rules = rules_for(QWEN3)
    rule, _ = match_source(rules, "language_model.model.layers.7.self_attn.rotary_emb.inv_freq")
    assert rule is not None and rule.targets == ()


# ---------------------------------------------------------------------------------------------------
# Errors on bad folders (through convert_checkpoint; nothing is written)


def expect_error(tmp_path, source, match, error=ConversionError):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert_checkpoint(source, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_tensors_are_listed(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    tensors = load_file(source / "model.safetensors")
    del tensors["mlp1.3.weight"], tensors["language_model.model.layers.1.mlp_ve.up_proj.weight"]
    rewrite(source, tensors=tensors)
    expect_error(
        tmp_path,
        source,
        r"missing keys \(2\): language_model\.model\.layers\.1\.mlp_ve\.up_proj\.weight, mlp1\.3\.weight",
    )


def test_unexpected_tensors_are_listed(tmp_path):
    source = copy_checkpoint("internlm2", tmp_path / "src")
    tensors = load_file(source / "model.safetensors")
    tensors["vision_model.encoder.layers.9.ls1"] = torch.zeros(32)
    rewrite(source, tensors=tensors)
    expect_error(tmp_path, source, r"unexpected keys \(1\): vision_model\.encoder\.layers\.9\.ls1")


def test_wrong_layout_folder_is_rejected(tmp_path):
    """A folder with a navil_chat config but our (converted) key names."""
    source = copy_checkpoint("qwen3", tmp_path / "src")
    original_config = load_original_config(source)
    converted = convert_state_dict(
        load_file(source / "model.safetensors"), QWEN3, convert_config(original_config, TOKEN_IDS).text_config
    )
    rewrite(source, tensors={k: v.contiguous() for k, v in converted.items()})
    expect_error(tmp_path, source, r"missing keys .* unexpected keys")


def test_missing_config_is_rejected(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    (source / "config.json").unlink()
    expect_error(tmp_path, source, "has no config.json")


def test_other_model_type_is_rejected(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    rewrite(source, config={**config, "model_type": "navil"})
    expect_error(tmp_path, source, r"model_type 'navil', expected 'navil_chat'.*already in our format")


def test_unknown_llm_architecture_is_rejected(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["architectures"] = ["LlamaVEForCausalLM"]
    rewrite(source, config=config)
    expect_error(
        tmp_path,
        source,
        r"unsupported llm_config\.architectures 'LlamaVEForCausalLM'; supported: Qwen3VEForCausalLM, InternLM2VEForCausalLM",
    )


def test_pickle_only_checkpoint_is_refused(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"not unpickled")
    expect_error(tmp_path, source, r"no safetensors weights; pickled weight files are refused \(pytorch_model\.bin\)")


def test_no_weights_is_rejected(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    (source / "model.safetensors").unlink()
    expect_error(tmp_path, source, r"has no safetensors weights$")


def test_missing_tokenizer_tokens_are_named(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<IMG_FRAME_BREAK>"]
    tokenizer["model"]["vocab"].pop("<IMG_FRAME_BREAK>", None)
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"].pop("9")
    tokenizer_config["additional_special_tokens"].remove("<IMG_FRAME_BREAK>")
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (source / "special_tokens_map.json").unlink()
    expect_error(tmp_path, source, r"tokenizer has no <IMG_FRAME_BREAK> token")


def test_tied_lm_head_that_differs_from_the_embedding_is_rejected(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    rewrite(source, config=config)
    expect_error(tmp_path, source, "tie_word_embeddings is true but language_model.lm_head.weight differs")


# ---------------------------------------------------------------------------------------------------
# Output folder handling


def test_existing_output_is_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert_checkpoint(checkpoint("qwen3"), out)
    assert (out / "keep.txt").read_text() == "mine"
    assert navil(["convert", str(checkpoint("qwen3")), str(out), "-q"]) == 2
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_the_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "navil"}')  # a NaViL folder: --force may replace it
    (out / "stale.txt").write_text("old")
    convert_checkpoint(checkpoint("qwen3"), out, force=True, verify=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_in_the_way_is_refused_even_with_force(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(ConversionError, match="not a directory"):
        convert_checkpoint(checkpoint("qwen3"), out, force=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_verification_writes_nothing(tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "navil"}')
        (out / "keep.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise VerificationError("logits differ (simulated)")

    monkeypatch.setattr(convert_module, "check_offloaded_logits", broken)
    with pytest.raises(VerificationError, match="simulated"):
        convert_checkpoint(checkpoint("internlm2"), out, force=True)
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_small_shards_stream_and_verify(tmp_path):
    # One shard per few tensors: the streamed writer names and indexes them as save_pretrained does, and
    # the sharded folder holds exactly the tensors of the single-file one.
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    convert_checkpoint(checkpoint("internlm2"), single)
    result = convert_checkpoint(checkpoint("internlm2"), sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {p.name for p in sharded.glob("*.safetensors")} == set(shards)
    whole = load_file(single / "model.safetensors")
    parts = {}
    for shard in shards:
        parts.update(load_file(sharded / shard))
    assert parts.keys() == whole.keys() and all(torch.equal(parts[k], whole[k]) for k in whole)
    assert "identical logits" in result.checks["logits"]


def test_corrupted_written_weights_fail_the_round_trip(tmp_path, monkeypatch):
    """Tamper with one tensor between writing and verifying: the round trip must notice."""
    real = convert_module.verify_streamed

    def tamper(folder, *args, **kwargs):
        path = Path(folder) / "model.safetensors"
        tensors = load_file(path)
        key = "model.language_model.layers.1.self_attn.k_proj_ve.weight"
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] += 1e-6
        save_file(tensors, str(path), metadata={"format": "pt"})
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(convert_module, "verify_streamed", tamper)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=r"round trip: .*layers\.1\.attention\.wqkv_ve\.weight"):
        convert_checkpoint(checkpoint("internlm2"), out)
    assert not out.exists()


def test_failure_while_publishing_leaves_no_temporary_folder(tmp_path):
    def fail(tmp):
        raise OSError("disk full (simulated)")

    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        convert_checkpoint(checkpoint("qwen3"), out, verify=False, _before_publish=fail)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# End to end


def check_hub_folder(out, name):
    from transformers import AutoConfig, AutoModel, AutoProcessor

    files = {p.name for p in out.iterdir()}
    for required in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "processor_config.json", "chat_template.jinja", "README.md", "configuration_navil.py",
                     "modeling_navil.py", "image_processing_navil.py", "processing_navil.py"):  # fmt: skip
        assert required in files, required
    assert "model.safetensors" in files or "model.safetensors.index.json" in files
    for code in ("configuration_navil.py", "modeling_navil.py", "image_processing_navil.py", "processing_navil.py"):
        assert (out / code).read_bytes() == (REPO_ROOT / code).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "navil" and config["architectures"] == ["NaViLForConditionalGeneration"]
    assert config["auto_map"]["AutoModel"] == "modeling_navil.NaViLForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_navil.NaViLConfig"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 4 and generation["pad_token_id"] == 2
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 1024
    card = (out / "README.md").read_text()
    assert "NaViL" in card and "trust_remote_code=True" in card and FIXTURES[name] in card

    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "NaViLConfig"
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "NaViLForConditionalGeneration"
    assert type(processor).__name__ == "NaViLProcessor"
    assert type(processor.image_processor).__name__ == "NaViLImageProcessor"
    assert processor.image_processor.min_dynamic_patch == 4 and processor.image_processor.max_dynamic_patch == 256
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if name == "qwen3" else "")
    )
    return model


@pytest.mark.parametrize("name", FIXTURES)
def test_navil_convert_in_process(tmp_path, capsys, name):
    out = tmp_path / "hub"
    assert navil(["convert", str(checkpoint(name)), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bit for bit" in printed and "identical logits" in printed
    model = check_hub_folder(out, name)
    original = load_original_state_dict(checkpoint(name))
    embed = (
        "language_model.model.embed_tokens.weight" if name == "qwen3" else "language_model.model.tok_embeddings.weight"
    )
    assert torch.equal(model.get_input_embeddings().weight, original[embed])
    assert torch.equal(model.model.special_token_embedding.weight, original["special_token_embedding.weight"])


def test_navil_convert_subprocess(tmp_path):
    out = tmp_path / "hub"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "navil_hf", "convert", str(checkpoint("internlm2")), str(out), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    check_hub_folder(out, "internlm2")


def test_sharded_input_and_output_and_bfloat16(tmp_path):
    """A sharded original (index + two files) converts into a sharded bfloat16 folder."""
    from transformers import AutoModel

    source = copy_checkpoint("qwen3", tmp_path / "src")
    tensors = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(source / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))

    out = tmp_path / "hub"
    result = convert_checkpoint(source, out, dtype="bfloat16", max_shard_size="200KB")
    assert result.dtype == torch.bfloat16 and "bit for bit" in result.checks["round trip"]
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, tensors["language_model.lm_head.weight"].to(torch.bfloat16))


def test_tied_checkpoint_without_lm_head(tmp_path):
    from transformers import AutoModel

    source = copy_checkpoint("internlm2", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["tie_word_embeddings"] = True
    tensors = load_file(source / "model.safetensors")
    del tensors["language_model.output.weight"]
    rewrite(source, config=config, tensors=tensors)
    out = tmp_path / "hub"
    convert_checkpoint(source, out)
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, tensors["language_model.model.tok_embeddings.weight"])


def test_license_is_carried_into_the_model_card(tmp_path):
    source = copy_checkpoint("qwen3", tmp_path / "NaViL-9B-like")
    (source / "README.md").write_text("---\nlicense: mit\npipeline_tag: image-text-to-text\n---\n# NaViL\n")
    (source / "LICENSE").write_text("MIT License\n")
    out = tmp_path / "hub"
    convert_checkpoint(source, out, verify=False)
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "NaViL-9B-like" in card and "not verified" not in card
    assert (out / "LICENSE").read_text() == "MIT License\n"


def test_to_original_state_dict_is_the_inverse_for_qwen3_after_conversion(tmp_path):
    """Converted folder -> original names again, from the written safetensors (the --to-original path)."""
    out = tmp_path / "hub"
    convert_checkpoint(checkpoint("qwen3"), out, verify=False)
    written = load_file(out / "model.safetensors")
    config = convert_config(load_original_config(checkpoint("qwen3")), TOKEN_IDS)
    back, not_reproduced = to_original_state_dict(written, QWEN3, config.text_config)
    original = load_file(checkpoint("qwen3") / "model.safetensors")
    assert not_reproduced == [] and set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
