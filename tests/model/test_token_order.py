"""`vision_config.token_order`: `"window"` (the original's order, SPEC §8.1, kept by converted checkpoints)
and `"raster"` (opt-in for new models: the encoder's output back in merge-block order, so the connector's
tokens follow the prompt's rows of `<IMG_CONTEXT>`). The window -> raster permutation is computed here
from the grid, independently of `modeling_navil.vision_layout`."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from configuration_navil import NaViLConfig, NaViLVisionConfig
from modeling_navil import NaViLForConditionalGeneration
from navil_hf.conversion.original import to_original_config
from navil_hf.errors import ConversionError

from conftest import fixtures_dir
from tiny import assert_fp_close, multimodal_inputs, tiny_model

# Patch grids whose merged grids (2x6, 5x3) are wider than a window of 2x2 merged blocks (window_size 4):
# window order != raster order, with edge windows in the second.
GRIDS = [(4, 12), (10, 6)]
WINDOW = 4
MERGE = 2


def window_to_raster_tokens(grids, window=WINDOW // MERGE, merge=MERGE):
    """For every token in window order (the encoder's order, SPEC §8.1: windows row-major, merged blocks
    row-major inside a window, edge windows smaller), its index in raster order of merged blocks; scales
    packed one after the other."""
    order, offset = [], 0
    for h, w in grids:
        mh, mw = h // merge, w // merge
        for top in range(0, mh, window):
            for left in range(0, mw, window):
                for r in range(top, min(top + window, mh)):
                    for c in range(left, min(left + window, mw)):
                        order.append(offset + r * mw + c)
        offset += mh * mw
    return torch.tensor(order)


def raster_from_window(window_rows, token_order, unit=1):
    """Rows in window order -> rows in raster order; `unit` consecutive rows per token (4 patches)."""
    out = torch.empty_like(window_rows)
    view_in, view_out = window_rows.reshape(-1, unit, *window_rows.shape[1:]), out.view(-1, unit, *out.shape[1:])
    view_out[token_order] = view_in
    return out


def _pair(seed=0):
    """The same weights with token_order "window" (the default) and "raster"."""
    window = tiny_model(seed=seed, window_size=WINDOW)
    config = copy.deepcopy(window.config)
    config.vision_config.token_order = "raster"
    raster = NaViLForConditionalGeneration(config).eval()
    raster.load_state_dict(window.state_dict())
    raster.set_attn_implementation("eager")
    for model in (window, raster):
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 127  # never generated: min_new_tokens below
    return window, raster


def test_orders_differ_on_these_grids():
    order = window_to_raster_tokens(GRIDS)
    assert sorted(order.tolist()) == list(range(len(order)))
    assert not torch.equal(order, torch.arange(len(order)))


def test_raster_features_are_window_features_in_raster_order():
    window, raster = _pair()
    inputs = multimodal_inputs(GRIDS)
    order = window_to_raster_tokens(GRIDS)
    kwargs = dict(output_hidden_states=True)
    with torch.no_grad():
        w = window.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **kwargs)
        r = raster.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], **kwargs)
        expected_lhs = raster_from_window(w.last_hidden_state, order, unit=MERGE * MERGE)
        # same connector on the same rows: exact
        expected_features = raster.model.connector(expected_lhs)
    assert torch.equal(r.last_hidden_state, expected_lhs)
    assert len(r.hidden_states) == len(w.hidden_states)
    for mine, theirs in zip(r.hidden_states, w.hidden_states):
        assert torch.equal(mine, raster_from_window(theirs, order, unit=MERGE * MERGE))
    assert torch.equal(r.hidden_states[-1], r.last_hidden_state)
    assert torch.equal(torch.cat(r.pooler_output), expected_features)
    # and the window model's tokens, permuted (the connector ran on other row positions: not exact by construction)
    assert_fp_close("raster tokens vs window tokens permuted", torch.cat(r.pooler_output),
                    raster_from_window(torch.cat(w.pooler_output), order))  # fmt: skip


def test_raster_on_a_grid_inside_one_window_changes_nothing():
    window, raster = _pair(seed=1)
    inputs = multimodal_inputs([(4, 4), (2, 4)])  # merged grids fit in one window: the two orders agree
    with torch.no_grad():
        assert torch.equal(window(**inputs).logits, raster(**inputs).logits)


def test_default_is_window_and_converted_folders_keep_it(qwen3_folder):
    assert NaViLVisionConfig().token_order == "window"
    assert NaViLConfig().vision_config.token_order == "window"
    assert "token_order" not in NaViLVisionConfig().to_dict()  # only "raster" is written
    source = fixtures_dir() / "original-qwen3-tiny"
    out = qwen3_folder  # `navil convert` with the defaults
    assert "token_order" not in (out / "config.json").read_text()
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.vision_config.token_order == "window"
    to_original_config(config)  # the default is what the original computes: representable

    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    case = json.loads((source / "expected.json").read_text())["cases"][0]
    images = [Image.open(source / name) for name in case["image"]]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": case["question"]}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")

    def logits(token_order=None):
        kwargs = dict(trust_remote_code=True, attn_implementation="eager", dtype=torch.float32)
        if token_order is not None:
            explicit = copy.deepcopy(config)
            explicit.vision_config.token_order = token_order
            kwargs["config"] = explicit
        model = AutoModel.from_pretrained(out, **kwargs).eval()
        assert model.config.vision_config.token_order == (token_order or "window")
        with torch.no_grad():
            return model(**inputs).logits

    default = logits()
    assert torch.equal(default, logits("window"))
    # the fixture's scales are wider than a window: raster order would change the logits
    assert (default - logits("raster")).abs().max().item() > 1e-3

    explicit = copy.deepcopy(config)
    explicit.vision_config.token_order = "raster"
    with pytest.raises(ConversionError, match="token_order is 'raster'"):
        to_original_config(explicit)


def test_save_and_load_keep_raster(tmp_path):
    _, raster = _pair(seed=2)
    raster.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["token_order"] == "raster"
    loaded = NaViLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.vision_config.token_order == "raster"
    assert NaViLConfig.from_pretrained(tmp_path).vision_config.token_order == "raster"
    inputs = multimodal_inputs(GRIDS)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, raster(**inputs).logits)


@pytest.mark.parametrize("bad", ["Raster", "row", None])
def test_invalid_token_order_is_refused(bad):
    with pytest.raises(ValueError, match="token_order must be one of 'window', 'raster'"):
        NaViLVisionConfig(token_order=bad)
    with pytest.raises(ValueError, match="token_order must be one of 'window', 'raster'"):
        NaViLConfig(vision_config={"token_order": bad})


def test_raster_model_forward_and_generate():
    window, raster = _pair(seed=3)
    inputs = multimodal_inputs(GRIDS)
    greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        logits = raster(**inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], raster.config.text_config.vocab_size)
        assert torch.isfinite(logits).all()
        assert (logits - window(**inputs).logits).abs().max().item() > 1e-4  # the order reaches the LLM
        cached = raster.generate(**inputs, use_cache=True, **greedy)
        uncached = raster.generate(**inputs, use_cache=False, **greedy)
        scores = raster.generate(**inputs, output_logits=True, return_dict_in_generate=True, **greedy).logits[0]
    assert cached.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(cached, uncached)
    assert_fp_close("raster first generated step vs forward", scores[0], logits[:, -1])
