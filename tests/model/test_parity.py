"""Parity with the original implementation, the way a user gets there: `navil convert` the fixture
checkpoint, load it with AutoModel/AutoProcessor(trust_remote_code=True), build the prompt through
the chat template, and compare with what the original code computed (fixtures/README.md)."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from conftest import fixtures_dir
from tiny import FP_ULPS, assert_fp_close

FIXTURES = ("original-qwen3-tiny", "original-internlm2-tiny")
CASES = (0, 1, 2)
BACKENDS = ("eager", "sdpa")
FIXTURE_ULPS = 4 * FP_ULPS  # logits against the fixtures, computed elsewhere (tiny.fp_tolerance)


@pytest.fixture(scope="module", params=FIXTURES)
def converted(request, converted_folder):
    source = fixtures_dir() / request.param
    out = converted_folder(request.param.split("-")[1])  # original-<family>-tiny
    expected = json.loads((source / "expected.json").read_text())
    tensors = load_file(source / "expected.safetensors")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    models = {
        attn: AutoModel.from_pretrained(
            out, trust_remote_code=True, attn_implementation=attn, dtype=torch.float32
        ).eval()
        for attn in BACKENDS
    }
    return dict(source=source, out=out, expected=expected, tensors=tensors, processor=processor, models=models)


def _case(converted, index):
    case = converted["expected"]["cases"][index]
    images = [Image.open(converted["source"] / name) for name in (case["image"] or [])]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": case["question"]}]
    prompt = converted["processor"].apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = converted["processor"](text=[prompt], images=[images] if images else None, return_tensors="pt")
    return case, images, inputs


def _expected(converted, index, name):
    return converted["tensors"].get(f"case{index}.{name}")


@pytest.mark.parametrize("index", CASES)
def test_processor_matches_original(converted, index):
    case, images, inputs = _case(converted, index)
    assert torch.equal(inputs["input_ids"], _expected(converted, index, "input_ids"))
    mask = _expected(converted, index, "visual_token_mask")
    if mask is not None:
        assert torch.equal(inputs["mm_token_type_ids"], mask.to(inputs["mm_token_type_ids"].dtype))
    if images:
        diff = (inputs["pixel_values"] - _expected(converted, index, "pixel_values")).abs().max().item()
        print(f"{converted['source'].name} case{index} pixel_values max-abs {diff:.3g}")
        assert diff <= 1e-5
        assert inputs["image_grid_thw"].tolist() == case["image_grid_thw"]
        assert inputs["num_scales"].tolist() == case["num_scales"]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("index", CASES)
def test_logits_match_original(converted, index, attn):
    _, _, inputs = _case(converted, index)
    with torch.no_grad():
        logits = converted["models"][attn](**inputs).logits
    # the fixture's logits were rounded on another machine by other code: twice the sources of rounding
    name = f"{converted['source'].name} case{index} {attn} logits"
    assert_fp_close(name, logits, _expected(converted, index, "logits"), ulps=FIXTURE_ULPS)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("index", CASES)
def test_greedy_generation_matches_original(converted, index, attn):
    _, _, inputs = _case(converted, index)
    expected = _expected(converted, index, "generated_ids")
    with torch.no_grad():
        out = converted["models"][attn].generate(
            **inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == expected[0].tolist()


@pytest.mark.parametrize("index", CASES)
def test_chat_matches_original_response(converted, index):
    """`model.chat` (the user's path) gives the original's decoded response for 12 tokens."""
    case, images, _ = _case(converted, index)
    model, processor = converted["models"]["sdpa"], converted["processor"]
    config = dict(max_new_tokens=12, do_sample=False)
    response = model.chat(processor, case["question"], images=images or None, generation_config=config)
    assert response == case["response"]
    streamed = "".join(
        model.chat(processor, case["question"], images=images or None, generation_config=config, stream=True)
    )
    assert streamed.strip() == case["response"]


def test_original_call_form_unchanged(converted):
    """`chat(tokenizer, pixel_values=..., question=..., num_patches_list=..., num_scales=...)`."""
    case, images, inputs = _case(converted, 1)
    model, processor = converted["models"]["eager"], converted["processor"]
    config = dict(max_new_tokens=12, do_sample=False)
    response = model.chat(
        processor.tokenizer,
        pixel_values=inputs["pixel_values"],
        question=case["question"],
        generation_config=config,
        num_patches_list=inputs["image_grid_thw"],
        num_scales=inputs["num_scales"].tolist(),
        anyres_image_size=True,
    )
    assert response == case["response"]
    positional = model.chat(processor.tokenizer, inputs["pixel_values"], case["question"], config,
                            num_patches_list=inputs["image_grid_thw"], num_scales=case["num_scales"])  # fmt: skip
    assert positional == response


def test_multi_turn_history_keeps_images(converted):
    case, images, _ = _case(converted, 0)
    model, processor = converted["models"]["sdpa"], converted["processor"]
    config = dict(max_new_tokens=4, do_sample=False)
    first, history = model.chat(
        processor, case["question"], images=images, generation_config=config, return_history=True
    )
    assert history == [("<image>\n" + case["question"], first, images)]
    second, history = model.chat(
        processor, "And its color?", history=history, generation_config=config, return_history=True
    )
    assert len(history) == 2 and history[1][:2] == ("And its color?", second)
    # The second prompt carries the first turn, its image included, in the template's layout.
    messages = [
        {"role": "user", "content": "<image>\n" + case["question"]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And its color?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        direct = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=end, pad_token_id=0)
    expected = processor.tokenizer.decode(direct[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert second == expected.strip()


def test_chat_errors_are_clear(converted):
    case, images, _ = _case(converted, 1)
    model, processor = converted["models"]["sdpa"], converted["processor"]
    with pytest.raises(ValueError, match="2 images given but the prompt has 1 <image> placeholders"):
        model.chat(processor, "<image>\nWhat is this?", images=images)
    with pytest.raises(ValueError, match="history turn 0 has 1 <image> placeholders but 0 images"):
        model.chat(processor, "Hi", history=[("<image>\nWhat?", "A square.")])
    long_question = "word " * 5000
    with pytest.raises(ValueError, match="context"):
        model.chat(processor, long_question, generation_config=dict(max_new_tokens=1))


# ---------------------------------------------------------------------------------------------------
# InternLM2 with the visual output chain folded (`navil convert --fold-visual-output`, inference only)

INTERNLM2 = "original-internlm2-tiny"


@pytest.fixture(scope="module")
def chained_and_folded(converted_folder):
    source = fixtures_dir() / INTERNLM2
    models = {}
    for form, flags in (("chained", []), ("folded", ["--fold-visual-output"])):
        out = converted_folder("internlm2", *flags)
        models[form] = AutoModel.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    assert models["chained"].config.text_config.chain_visual_output is True
    assert models["folded"].config.text_config.chain_visual_output is False
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    expected = json.loads((source / "expected.json").read_text())
    return dict(source=source, models=models, processor=processor, expected=expected,
                tensors=load_file(source / "expected.safetensors"))  # fmt: skip


@pytest.mark.parametrize("index", CASES)
def test_folded_internlm2_matches_original_and_chained(chained_and_folded, index):
    _, _, inputs = _case(chained_and_folded, index)
    with torch.no_grad():
        logits = {form: model(**inputs).logits for form, model in chained_and_folded["models"].items()}
        generated = chained_and_folded["models"]["folded"].generate(
            **inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = _expected(chained_and_folded, index, "logits")
    # the fold's product W_ve @ W is rounded once more than the chain: still a few ulps of the logits
    assert_fp_close(f"internlm2 case{index} folded vs original logits", logits["folded"], expected, ulps=FIXTURE_ULPS)
    assert_fp_close(f"internlm2 case{index} folded vs chained logits", logits["folded"], logits["chained"])
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == _expected(chained_and_folded, index, "generated_ids")[0].tolist()
