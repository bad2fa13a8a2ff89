"""navil_hf.research.accounting: the parameter inventory computed from a config equals the model's own
`named_parameters` (both LLM families, tied and untied, every bias and norm option; full-size configs on the
meta device); trainable counts follow `requires_grad` and the freeze presets; the FLOPs equal what
`torch.utils.flop_counter.FlopCounterMode` counts on real tiny forwards and training steps, per component;
the conventions (causal keys, LM head positions, 3x training, 2ND) hold; `navil params` prints them. Models
without visual experts (`visual_experts=False`) are counted the same ways: no `visual_experts` parameters or
FLOPs, visual tokens computed with the text weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from configuration_navil import NaViLConfig
from image_processing_navil import NaViLImageProcessor
from modeling_navil import NaViLForConditionalGeneration
from navil_hf.cli import main as navil
from navil_hf.conversion.original import convert_config
from navil_hf.research.accounting import (
    FLOP_COMPONENTS,
    TOKEN_TYPES,
    count_flops,
    count_parameters,
    load_config,
    parameter_inventory,
    summary,
)
from navil_hf.training.parts import PARTS, parameter_part, set_trainable

from conftest import token_ids
from tiny import full_size_original_config, multimodal_inputs, tiny_config, tiny_model

aten = torch.ops.aten
GRIDS = [(4, 4), (6, 8)]  # one image, two scales: one window and four uneven windows (window_size 4)
FAMILIES = {
    "qwen3": {},
    "internlm2": dict(qk_norm=False, chain_visual_output=True),
    "qwen3-tied": dict(tie_word_embeddings=True),
    "internlm2-tied": dict(qk_norm=False, chain_visual_output=True, tie_word_embeddings=True),
}
# Without visual experts: every token takes the text weights (Qwen3-like; Llama-like, tied).
NO_EXPERTS = {
    "qwen3-no-experts": dict(visual_experts=False),
    "llama-no-experts-tied": dict(qk_norm=False, visual_experts=False, tie_word_embeddings=True),
}
VARIANTS = {
    **FAMILIES,
    **NO_EXPERTS,
    "biases": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "vision-layer-norm": dict(norm_type="layer_norm", qk_normalization=True),
    "vision-all-full": dict(fullatt=None),
}


def model_sizes(model):
    return {name: p.numel() for name, p in model.named_parameters()}


def counted(model, inputs, backward=False):
    """What FlopCounterMode counts for a forward (and backward): the total, the matmul-only part (mm, addmm),
    and per FLOP component: the weight matmuls of each module by its part, the attention bmm of each tower."""
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = model(**inputs, labels=inputs["input_ids"] if backward else None)
        if backward:
            out.loss.backward()
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    modules = dict(model.named_modules())
    components = dict.fromkeys(FLOP_COMPONENTS, 0)
    for key, ops in counts.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
            components[parameter_part(name + ".weight")] += sum(ops.values())
    components["vision_attention"] = counts[prefix + "model.vision_model"].get(aten.bmm, 0)
    components["llm_attention"] = counts[prefix + "model.language_model"].get(aten.bmm, 0)
    total = counts["Global"]
    matmuls = total.get(aten.mm, 0) + total.get(aten.addmm, 0)
    return counter.get_total_flops(), matmuls, components


def analytic(config, inputs, **options):
    return count_flops(
        config,
        grids=inputs["image_grid_thw"],
        num_scales=[len(inputs["image_grid_thw"])],
        token_types=inputs["mm_token_type_ids"][0],
        **options,
    )


# ---------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("variant", VARIANTS)
def test_inventory_equals_named_parameters(variant):
    model = tiny_model(**VARIANTS[variant])
    assert parameter_inventory(model.config) == model_sizes(model)
    from_model, from_config = count_parameters(model), count_parameters(model.config)
    assert from_model.to_dict() == from_config.to_dict()
    per_part = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        per_part[parameter_part(name)] += p.numel()
    assert from_model.total == per_part
    assert from_model.total_params == sum(p.numel() for p in model.parameters())
    assert from_model.trainable == from_model.total


@pytest.mark.parametrize("llm", ["qwen3", "internlm2"])
def test_full_size_inventory_on_meta(llm):
    config = convert_config(full_size_original_config(llm), token_ids())
    with torch.device("meta"):
        model = NaViLForConditionalGeneration(config)
    assert parameter_inventory(config) == model_sizes(model)
    count = count_parameters(config)
    assert count.total_params == sum(p.numel() for p in model.parameters())
    assert count.chain_visual_output == (llm == "internlm2")


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_head_counted_once_and_active_parameters(family):
    model = tiny_model(**FAMILIES[family])
    tc = model.config.text_config
    tied = bool(tc.tie_word_embeddings)
    count = count_parameters(model)
    sizes = model_sizes(model)
    matrix = tc.vocab_size * tc.hidden_size
    assert count.tied == tied and count.head == matrix
    assert count.total["embeddings"] == matrix
    assert count.total["lm_head"] == (0 if tied else matrix)

    shared = sum(n for name, n in sizes.items() if "layernorm" in name or name == "model.language_model.norm.weight")
    chained = sum(n for name, n in sizes.items() if ".self_attn.o_proj." in name) if tc.chain_visual_output else 0
    t = count.total
    assert count.active_params("text") == t["embeddings"] + t["text"] + t["lm_head"]
    assert count.active_params("text", include_embeddings=False) == t["text"] + matrix
    visual = t["vision"] + t["connector"] + t["visual_experts"] + shared + chained
    assert count.active_params("visual") == count.active_params("visual", include_embeddings=False) == visual
    with_logits = count_parameters(model, logits_at_visual=True)
    assert with_logits.active_params("visual") == visual + matrix
    assert count.non_embedding_params() == count.total_params - t["special_tokens"] - (0 if tied else matrix)


@pytest.mark.parametrize("variant", NO_EXPERTS)
def test_without_visual_experts_visual_tokens_use_the_text_weights(variant):
    options = NO_EXPERTS[variant]
    model = tiny_model(**options)
    with_experts = count_parameters(tiny_config(**dict(options, visual_experts=True)))
    count = count_parameters(model)
    t = count.total
    assert not count.visual_experts and count.to_dict()["visual_experts"] is False
    assert t["visual_experts"] == count.trainable["visual_experts"] == 0
    assert count.total_params == with_experts.total_params - with_experts.total["visual_experts"]
    assert t == {**with_experts.total, "visual_experts": 0}
    assert count.active["visual"]["visual_experts"] == 0
    assert count.active_params("visual") == t["vision"] + t["connector"] + t["text"]
    assert count.active_params("text") == t["embeddings"] + t["text"] + t["lm_head"]
    assert "no visual experts" in summary(model)
    # The same matmuls as the experts model (its experts are the text weights' shapes), booked as text.
    inputs = multimodal_inputs(GRIDS)
    ours = analytic(model.config, inputs, causal="full").flops
    theirs = analytic(tiny_config(**dict(options, visual_experts=True)), inputs, causal="full").flops
    assert ours["visual_experts"] == {"text": 0, "visual": 0}
    assert ours["text"] == {"text": theirs["text"]["text"], "visual": theirs["visual_experts"]["visual"]}
    assert all(ours[c] == theirs[c] for c in FLOP_COMPONENTS if c not in ("text", "visual_experts"))


@pytest.mark.parametrize("family", ["qwen3", "internlm2-tied", "qwen3-no-experts"])
@pytest.mark.parametrize("preset", ["stage1", "llm", ["connector", "lm_head"]])
def test_trainable_follows_requires_grad_and_presets(family, preset):
    model = tiny_model(**VARIANTS[family])
    expected = set_trainable(model, preset)
    assert count_parameters(model).trainable == expected
    assert count_parameters(model.config, trainable=preset).trainable == expected
    assert count_parameters(model).total == count_parameters(model.config).total


# ---------------------------------------------------------------------------------------------------
# FLOPs against torch's counter


@pytest.mark.parametrize(
    "variant", ["qwen3", "internlm2", "internlm2-tied", "vision-all-full", "qwen3-no-experts", "llama-no-experts-tied"]
)
def test_forward_flops_equal_flop_counter(variant):
    model = tiny_model(attn="eager", **VARIANTS[variant])
    inputs = multimodal_inputs(GRIDS)
    total, matmuls, components = counted(model, inputs)
    # Eager attention computes every score of the L x L (and scale / window) products: causal="full".
    count = analytic(model.config, inputs, causal="full")
    assert count.total == total
    assert count.by_component() == components
    assert analytic(model.config, inputs, attention=False).total == matmuls
    assert sum(count.by_token_type().values()) == sum(count.by_component().values()) == count.total


def test_sdpa_counts_the_same_matmuls():
    model = tiny_model(attn="sdpa", **FAMILIES["internlm2"])
    inputs = multimodal_inputs(GRIDS)
    _, matmuls, _ = counted(model, inputs)
    assert analytic(model.config, inputs, attention=False).total == matmuls


@pytest.mark.parametrize("family", ["qwen3", "internlm2-tied", "qwen3-no-experts"])
def test_training_step_is_three_forwards(family):
    model = tiny_model(attn="eager", **VARIANTS[family]).train()
    inputs = multimodal_inputs(GRIDS)
    total, _, _ = counted(model, inputs, backward=True)
    train = analytic(model.config, inputs, causal="full", training=True)
    forward = analytic(model.config, inputs, causal="full")
    assert train.total == total
    vc = model.config.vision_config
    patch_embed = 2 * train.tokens["patches"] * vc.num_channels * vc.patch_size**2 * vc.hidden_size
    assert train.total == 3 * forward.total - patch_embed  # pixels need no gradient
    assert train.approx == {t: 3 * v for t, v in forward.approx.items()}


def test_text_only_forward_is_all_text():
    model = tiny_model(attn="eager")
    input_ids = torch.arange(20, 45).unsqueeze(0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids)
    count = count_flops(model.config, text_tokens=25, causal="full")
    assert count.total == counter.get_total_flops()
    assert count.by_token_type()["visual"] == 0
    assert count.tokens["patches"] == 0


def test_vision_encoder_without_layers():
    """An early-fusion-style config: patches are embedded and merged, no ViT layer. The model allows it."""
    config = tiny_config(fullatt=None)
    config.vision_config.num_hidden_layers = 0
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    assert parameter_inventory(config) == model_sizes(model)
    inputs = multimodal_inputs(GRIDS)
    total, _, components = counted(model, inputs)
    count = analytic(config, inputs, causal="full")
    assert count.total == total and count.by_component() == components
    assert count.by_component()["vision_attention"] == 0


# ---------------------------------------------------------------------------------------------------
# Conventions


def test_causal_conventions():
    config = tiny_config()
    tc = config.text_config
    length = 25
    per_pair = 4 * tc.num_attention_heads * tc.head_dim * tc.num_hidden_layers
    attention = {
        c: count_flops(config, text_tokens=length, causal=c).by_component()["llm_attention"]
        for c in ("exact", "half", "full")
    }
    assert attention["full"] == per_pair * length * length
    assert attention["half"] == per_pair * length * length // 2
    assert attention["exact"] == per_pair * length * (length + 1) // 2
    # The order of the tokens changes only the exact split between token types.
    inputs = multimodal_inputs(GRIDS)
    types = inputs["mm_token_type_ids"][0]
    for causal in ("exact", "half", "full"):
        forward = analytic(config, inputs, causal=causal)
        backward = analytic(config, dict(inputs, mm_token_type_ids=types.flip(0).unsqueeze(0)), causal=causal)
        assert forward.total == backward.total
        same_split = forward.by_token_type() == backward.by_token_type()
        assert same_split == (causal != "exact")


def test_images_by_size_follow_the_processor():
    config = tiny_config()
    processor = NaViLImageProcessor(
        min_dynamic_patch=config.min_dynamic_patch, max_dynamic_patch=config.max_dynamic_patch
    )
    sizes = [(100, 80), (40, 200)]  # (width, height)
    images = [Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out = processor(images, return_tensors="pt")
    by_size = count_flops(config, sizes, text_tokens=10)
    by_grid = count_flops(config, grids=out["image_grid_thw"], num_scales=out["num_scales"], text_tokens=10)
    assert by_size == by_grid
    assert by_size.tokens["patches"] == out["pixel_values"].shape[0]
    prompt = sum(processor.num_image_tokens(h, w) for w, h in sizes)
    assert by_size.tokens["sequence"] == prompt + 10
    assert count_flops(config, ["100x80"]).total == count_flops(config, [images[0]]).total


def test_lm_head_positions_and_embeddings():
    config = tiny_config()
    tc = config.text_config
    head = 2 * tc.hidden_size * tc.vocab_size
    inputs = multimodal_inputs(GRIDS)
    n_text = int((inputs["mm_token_type_ids"] == 0).sum())
    n_visual = int(inputs["mm_token_type_ids"].sum())
    heads = {
        option: analytic(config, inputs, lm_head=option).flops["lm_head"]
        for option in ("all", "text", "last", "none", 5)
    }
    assert heads["all"] == {"text": head * n_text, "visual": head * n_visual}
    assert heads["text"] == {"text": head * n_text, "visual": 0}
    assert heads["last"] == {"text": head, "visual": 0}  # the prompt ends in text
    assert heads["none"] == {"text": 0, "visual": 0}
    assert heads[5] == {"text": 5 * head, "visual": 0}
    with_embeddings = analytic(config, inputs)
    without = analytic(config, inputs, include_embeddings=False)
    assert with_embeddings.total == without.total  # lookups cost nothing
    assert with_embeddings.approx["text"] - without.approx["text"] == 2 * tc.vocab_size * tc.hidden_size * n_text
    assert with_embeddings.approx_total >= analytic(config, inputs, attention=False).total


def test_counts_add_and_mistakes_are_named():
    config = tiny_config()
    one, two = count_flops(config, [(64, 64)], 7), count_flops(config, text_tokens=12)
    both = one + two
    assert both.total == one.total + two.total and both.tokens["sequence"] == one.tokens["sequence"] + 12
    with pytest.raises(ValueError, match="causal"):
        count_flops(config, text_tokens=3, causal="quarter")
    with pytest.raises(ValueError, match="labelled positions"):
        count_flops(config, text_tokens=3, lm_head=4)
    with pytest.raises(ValueError, match="not both"):
        count_flops(config, [(64, 64)], grids=[(1, 4, 4)])
    with pytest.raises(ValueError, match="visual tokens"):
        count_flops(config, grids=[(1, 4, 4)], token_types=[0, 1, 0])
    with pytest.raises(ValueError, match="merge"):
        count_flops(config, grids=[(1, 3, 4)])
    with pytest.raises(ValueError, match="adds up"):
        count_flops(config, grids=[(1, 4, 4)], num_scales=[2])
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        count_flops(config, ["64 by 64"])


# ---------------------------------------------------------------------------------------------------
# Config files and `navil params`


def test_load_config_reads_config_json_only(tmp_path):
    config = tiny_config(chain_visual_output=True, qk_norm=False)
    config.save_pretrained(tmp_path / "hub")
    for path in (tmp_path / "hub", tmp_path / "hub" / "config.json"):
        assert count_parameters(path).to_dict() == count_parameters(config).to_dict()
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps(full_size_original_config("internlm2")))
    assert (
        count_parameters(original).total
        == count_parameters(convert_config(full_size_original_config("internlm2"), token_ids())).total
    )
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama"}))
    for path, message in ((tmp_path / "missing", "not a config.json"), (tmp_path / "other.json", "'llama'")):
        with pytest.raises(ValueError, match=message):
            load_config(path)


def test_cli(tmp_path, capsys):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    argv = [str(tmp_path), "--image", "100x80", "--text-tokens", "20", "--training", "--trainable", "stage1"]
    assert navil(["params", *argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params = count_parameters(config, trainable="stage1")
    flops = count_flops(config, [(100, 80)], 20, training=True)
    assert out == {"parameters": params.to_dict(), "flops": flops.to_dict()}
    assert navil(["params", *argv]) == 0
    text = capsys.readouterr().out
    assert text.strip() == summary(config, [(100, 80)], 20, training=True, trainable="stage1").strip()
    for part in (*PARTS, *FLOP_COMPONENTS, *TOKEN_TYPES, "6ND"):
        assert part in text
    assert navil(["params", str(tmp_path)]) == 0 and "FLOPs" not in capsys.readouterr().out  # parameters only

    for bad in ([str(tmp_path / "nowhere")], [str(tmp_path), "--image", "100"], [str(tmp_path), "--lm-head", "x"]):
        assert navil(["params", *bad]) == 2
        assert "error" in capsys.readouterr().err.strip().splitlines()[-1]


def test_config_dict_and_model_inputs_agree():
    model = tiny_model()
    as_dict = model.config.to_dict()
    assert count_parameters(as_dict).to_dict() == count_parameters(model).to_dict()
    assert count_flops(model, [(64, 96)], 5) == count_flops(NaViLConfig(**as_dict), [(64, 96)], 5)
