"""`text_config.visual_experts=False`: NaViL without visual experts (early fusion into the LLM's own weights).

The model has no `*_ve` module or parameter and exactly the experts model's parameters minus its experts; an
experts model whose every `*_ve` weight equals its text twin computes the same logits (and training loss) as
the model without experts on a prompt with an image -- the switch changes nothing but the experts; it
routes nothing (no sort, no host sync); it saves and loads (remote code too), generates the same with and
without the cache, trains (every parameter gets a gradient; `stage1` works, its `visual_experts` part
empty), and `navil train` runs on it end to end. Old config.json files (no key) keep their experts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

import modeling_navil
from configuration_navil import NaViLConfig, NaViLTextConfig
from modeling_navil import NaViLForConditionalGeneration
from navil_hf.training.parts import PARTS, parameter_part, set_trainable

from conftest import fixtures_dir
from tiny import assert_fp_close, multimodal_inputs, tiny_config, tiny_model, write_hub_folder

GRIDS = [(4, 4), (6, 8)]  # one image, two scales
FAMILIES = {"qwen3": dict(qk_norm=True), "llama": dict(qk_norm=False)}
EXPERT_MARKERS = ("_ve.", "mlp_ve")


def expert_names(model):
    return [name for name, _ in model.named_parameters() if any(m in name for m in EXPERT_MARKERS)]


def without_experts(seed=0, **options):
    return tiny_model(seed=seed, visual_experts=False, **options)


def experts_equal_to_text(model, **options):
    """An experts model (`tiny_config(**options)`) with the weights of `model` (no experts) and every `*_ve`
    weight its text twin's."""
    experts = tiny_model(**options)
    ours = model.state_dict()
    state = {name: ours[name.replace("mlp_ve.", "mlp.").replace("_ve.", ".")].clone() for name in experts.state_dict()}
    experts.load_state_dict(state, strict=True)
    return experts


# ---------------------------------------------------------------------------------------------------
# Config


def test_config_default_old_files_and_chained_output():
    assert NaViLTextConfig().visual_experts is True
    data = tiny_config().to_dict()
    del data["text_config"]["visual_experts"]  # a config.json written before the switch existed
    assert NaViLConfig.from_dict(data).text_config.visual_experts is True
    off = tiny_config(visual_experts=False)
    assert NaViLConfig.from_dict(off.to_dict()).text_config.visual_experts is False
    with pytest.raises(ValueError, match="chain_visual_output=True .* visual_experts=False"):
        NaViLTextConfig(chain_visual_output=True, visual_experts=False)


# ---------------------------------------------------------------------------------------------------
# Modules and parameters


@pytest.mark.parametrize("family", FAMILIES)
def test_no_expert_modules_and_the_parameter_count(family):
    model = without_experts(**FAMILIES[family])
    assert expert_names(model) == []
    assert not [name for name, _ in model.named_modules() if name.endswith("_ve")]
    experts = tiny_model(**FAMILIES[family])
    expert_weights = sum(
        p.numel() for name, p in experts.named_parameters() if parameter_part(name) == "visual_experts"
    )
    assert expert_weights > 0 and len(expert_names(experts)) > 0
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in experts.parameters()) - expert_weights
    # Every other parameter has the experts model's name and shape.
    theirs = {n: p.shape for n, p in experts.named_parameters() if parameter_part(n) != "visual_experts"}
    assert {n: p.shape for n, p in model.named_parameters()} == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_equal_to_their_text_twins_give_the_same_logits(family):
    """The key equivalence: the switch removes the experts and changes nothing else (fp32, a few ulps: tiny.fp_tolerance)."""
    model = without_experts(seed=1, **FAMILIES[family])
    experts = experts_equal_to_text(model, **FAMILIES[family])
    inputs = multimodal_inputs(GRIDS)
    assert inputs["mm_token_type_ids"].sum() > 0  # the experts model routes visual tokens to its experts
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, experts(**inputs).logits
    assert_fp_close("no experts vs experts equal to the text weights", ours, theirs)
    # Training mode too (the experts model then runs both experts in every forward): the same loss.
    model.train(), experts.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert_fp_close("training loss", loss, experts(**inputs, labels=inputs["input_ids"]).loss)
    # Without experts the visual mask is ignored; experts that differ from the text weights do change the
    # logits (the equivalence above is not vacuous).
    model.eval(), experts.eval()
    with torch.no_grad():
        unrouted = model(**{**inputs, "mm_token_type_ids": torch.zeros_like(inputs["mm_token_type_ids"])}).logits
        assert torch.equal(unrouted, ours)
        experts.model.language_model.layers[0].mlp_ve.down_proj.weight.mul_(2.0)
        assert (experts(**inputs).logits - ours).abs().max() > 1e-3


def test_no_routing_no_host_sync(monkeypatch):
    model = without_experts()

    def refuse(mask):
        raise AssertionError("a model without visual experts sorted its tokens by modality")

    monkeypatch.setattr(modeling_navil, "_routing_order", refuse)
    with torch.no_grad():
        model(**multimodal_inputs(GRIDS))
    model.train()
    model(**multimodal_inputs(GRIDS), labels=multimodal_inputs(GRIDS)["input_ids"]).loss.backward()


# ---------------------------------------------------------------------------------------------------
# Save / load, generation


def test_save_and_load_give_identical_logits(tmp_path):
    model = without_experts(seed=2)
    folder = write_hub_folder(model, tmp_path / "hub")
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["visual_experts"] is False
    assert not [k for k in load_file(folder / "model.safetensors") if any(m in k for m in EXPERT_MARKERS)]
    loaded, info = NaViLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    inputs = multimodal_inputs(GRIDS)
    with torch.no_grad():
        expected = model(**inputs).logits
        for other in (loaded, remote):
            other.eval().set_attn_implementation("eager")
            assert torch.equal(other(**inputs).logits, expected)
    assert expert_names(remote) == []


@pytest.mark.parametrize("with_image", [True, False])
def test_generate_with_and_without_cache(with_image):
    model = without_experts(seed=3)
    inputs = multimodal_inputs(GRIDS) if with_image else {"input_ids": torch.tensor([[20, 21, 22, 23, 24]])}
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **greedy)
        uncached = model.generate(**inputs, use_cache=False, **greedy)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_reaches_every_parameter(family):
    model = without_experts(seed=4, **FAMILIES[family]).train()
    inputs = multimodal_inputs(GRIDS)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # A batch without images still reaches the vision side (NaViLModel._idle_vision: zero gradients).
    model.zero_grad()
    text = torch.tensor([[20, 21, 22, 23, 24, 25]])
    model(input_ids=text, labels=text).loss.backward()
    vision = [(n, p) for n, p in model.named_parameters() if parameter_part(n) in ("vision", "connector")]
    assert vision and all(p.grad is not None and not p.grad.any() for _, p in vision)


def test_stage1_without_experts_trains_the_vision_side_only():
    model = without_experts()
    counts = set_trainable(model, "stage1")
    assert counts["visual_experts"] == 0 and counts["text"] == 0 and counts["embeddings"] == 0
    assert counts["vision"] > 0 and counts["connector"] > 0 and counts["special_tokens"] > 0
    trained = {parameter_part(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"vision", "connector", "special_tokens"}
    assert set(counts) == set(PARTS)


def _no_experts_hub(source, out):
    """A Hub folder without experts from a converted one: the config's switch off, the `*_ve` tensors dropped."""
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(visual_experts=False, chain_visual_output=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = load_file(out / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not any(m in k for m in EXPERT_MARKERS)}
    assert len(kept) < len(weights)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_navil_train_runs_without_experts(tmp_path, qwen3_folder):
    from navil_hf.training.train import parse_config, train

    source = fixtures_dir() / "original-qwen3-tiny"
    hub = _no_experts_hub(qwen3_folder, tmp_path / "hub")
    (tmp_path / "data").mkdir()
    image = tmp_path / "data" / "a.png"
    Image.open(source / "image0.png").convert("RGB").resize((48, 32)).save(image)
    records = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A red thing."}]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
    ]  # fmt: skip
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {
        "model": str(hub),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "data" / "train.jsonl")},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 2e-3, "logging_steps": 1,
                     "save_steps": 2, "disable_tqdm": True},
    }  # fmt: skip
    result = train(parse_config(raw), force=True)
    assert result.trainable["visual_experts"] == 0 and result.trainable["text"] > 0
    before, after = load_file(hub / "model.safetensors"), load_file(Path(result.model_dir) / "model.safetensors")
    assert before.keys() == after.keys()
    assert {parameter_part(k) for k in before if not torch.equal(before[k], after[k])} >= {"vision", "text"}
    model = AutoModel.from_pretrained(result.model_dir, trust_remote_code=True)
    assert model.config.text_config.visual_experts is False and expert_names(model) == []
    processor = AutoProcessor.from_pretrained(result.model_dir, trust_remote_code=True)
    answer = model.chat(processor, "What?", images=[Image.open(image)], generation_config=dict(max_new_tokens=3))
    assert isinstance(answer, str)
