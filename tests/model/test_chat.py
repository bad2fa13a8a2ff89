"""`model.chat` complete (API.md): streaming, `batch_chat`, multi-turn history with images in any turn,
several images per turn -- each checked against an independent way of computing the same answer, on a
converted fixture loaded through AutoModel/AutoProcessor."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from conftest import fixtures_dir

GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def chat_model(qwen3_folder):
    source, out = fixtures_dir() / "original-qwen3-tiny", qwen3_folder
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    # Small images keep the prompts short: PIL images of two shapes and a numpy HWC array.
    images = [Image.open(source / "image0.png").convert("RGB").resize((48, 32)),
              Image.open(source / "image1.png").convert("RGB").resize((32, 64))]  # fmt: skip
    images.append(np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8))
    return model.eval(), processor, images


def direct_answer(model, processor, messages, images, max_new_tokens=GREEDY["max_new_tokens"]):
    """The answer computed without `chat`: template -> processor -> generate -> decode."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end, pad_token_id=end
        )
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def user(text, num_images=0):
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def test_several_images_in_one_turn(chat_model):
    model, processor, images = chat_model
    answer = model.chat(processor, "Compare them.", images=images, generation_config=GREEDY)
    assert answer == direct_answer(model, processor, [user("Compare them.", 3)], images)


def test_history_with_images_in_any_turn(chat_model):
    model, processor, images = chat_model
    first, history = model.chat(processor, "Hello.", generation_config=GREEDY, return_history=True)
    second, history = model.chat(processor, "What is this?", images=[images[0]], history=history,
                                 generation_config=GREEDY, return_history=True)  # fmt: skip
    third, history = model.chat(processor, "And these two?", images=images[1:], history=history,
                                generation_config=GREEDY, return_history=True)  # fmt: skip
    assert [turn[0] for turn in history] == ["Hello.", "<image>\nWhat is this?", "<image>\n<image>\nAnd these two?"]
    assert [len(turn[2]) for turn in history] == [0, 1, 2]
    messages = [
        user("Hello."), {"role": "assistant", "content": first},
        user("What is this?", 1), {"role": "assistant", "content": second},
        user("And these two?", 2),
    ]  # fmt: skip
    assert third == direct_answer(model, processor, messages, images)
    # Placeholders written by the user inside the question are taken as they are.
    inline = model.chat(processor, "First <image> then <image>?", images=images[:2], generation_config=GREEDY)
    messages = [{"role": "user", "content": "First <image> then <image>?"}]
    assert inline == direct_answer(model, processor, messages, images[:2])


def test_stream_yields_pieces_that_join_to_the_answer(chat_model):
    model, processor, images = chat_model
    config = dict(max_new_tokens=16, do_sample=False)
    answer = model.chat(processor, "Describe the image.", images=[images[0]], generation_config=config)
    stream = model.chat(processor, "Describe the image.", images=[images[0]], generation_config=config, stream=True)
    assert not isinstance(stream, str)
    pieces = list(stream)
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces).strip() == answer


def test_stream_keeps_the_history(chat_model):
    """`stream=True, return_history=True`: once exhausted, the stream holds the answer and the history that
    the same call without streaming returns."""
    model, processor, images = chat_model
    config = dict(max_new_tokens=8, do_sample=False)
    answer, history = model.chat(
        processor, "Describe.", images=[images[0]], generation_config=config, return_history=True
    )
    stream = model.chat(
        processor, "Describe.", images=[images[0]], generation_config=config, return_history=True, stream=True
    )
    assert stream.history is None  # not before the end
    assert "".join(stream).strip() == answer == stream.response
    assert stream.history == history


def test_leaving_a_stream_early_stops_its_generation(chat_model):
    import threading

    model, processor, images = chat_model
    before = threading.active_count()
    stream = model.chat(
        processor, "Describe.", images=[images[0]], generation_config=dict(max_new_tokens=200), stream=True
    )
    next(stream)
    stream.close()
    assert threading.active_count() == before  # the generation thread was stopped and joined


def test_stream_raises_the_generation_error_instead_of_hanging(chat_model):
    model, processor, images = chat_model
    calls = []

    def fail_on_third_step(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")

    handle = model.lm_head.register_forward_hook(fail_on_third_step)
    outcome = {}

    def consume():
        try:
            outcome["pieces"] = list(model.chat(processor, "Describe.", images=[images[0]], stream=True,
                                                generation_config=dict(max_new_tokens=20)))  # fmt: skip
        except Exception as error:  # noqa: BLE001 -- checked below
            outcome["error"] = error

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=60)
    handle.remove()
    assert not thread.is_alive(), "the stream hung after the generation thread failed"
    assert isinstance(outcome.get("error"), RuntimeError) and "boom in step 3" in str(outcome["error"]), outcome
    assert len(calls) == 3


def test_batch_chat_equals_one_by_one(chat_model):
    model, processor, images = chat_model
    questions = ["What is in the picture?", "Hi", "Which of the two is brighter, and why do you think so?"]
    per_question = [[images[0]], [], [images[1], images[2]]]
    batched = model.batch_chat(processor, questions, images=per_question, generation_config=GREEDY)
    single = [
        model.chat(processor, q, images=i or None, generation_config=GREEDY) for q, i in zip(questions, per_question)
    ]
    assert batched == single
    # Text only, no images argument at all.
    assert model.batch_chat(processor, questions[:2], generation_config=GREEDY) == [
        model.chat(processor, q, generation_config=GREEDY) for q in questions[:2]
    ]


def test_batch_chat_errors(chat_model):
    model, processor, images = chat_model
    with pytest.raises(ValueError, match="non-empty list of questions"):
        model.batch_chat(processor, "one question")
    with pytest.raises(ValueError, match="2 questions but 1 image lists"):
        model.batch_chat(processor, ["a", "b"], images=[[images[0]]])
    with pytest.raises(ValueError, match="sample 0: 2 images given but the prompt has 1"):
        model.batch_chat(processor, ["<image>\nOne?", "b"], images=[images[:2], []])


def test_chat_and_batch_chat_go_through_encode_conversation(chat_model, monkeypatch):
    """The processor's `encode_conversation` is the one path to model inputs: chat and batch_chat hand it
    the conversation (user text as typed, images with their turn) and generate from what it returns."""
    model, processor, images = chat_model
    calls, encode = [], processor.encode_conversation

    def spy(conversation, *args, **kwargs):
        calls.append(conversation)
        return encode(conversation, *args, **kwargs)

    monkeypatch.setattr(processor, "encode_conversation", spy)
    _, history = model.chat(
        processor, "What <|im_end|> is this?", images=[images[0]], system_message="S", generation_config=GREEDY,
        return_history=True,
    )  # fmt: skip
    model.chat(processor, "And now?", history=history, generation_config=GREEDY)
    model.batch_chat(processor, ["One?", "Two?"], images=[[images[1]], []], generation_config=GREEDY)
    first = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "What <|im_end|> is this?", "images": [images[0]]},
    ]
    assert calls[0] == first
    assert calls[1] == [
        {"role": "user", "content": "<image>\nWhat <|im_end|> is this?", "images": [images[0]]},
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": "And now?", "images": []},
    ]
    assert calls[2] == [
        [{"role": "user", "content": "One?", "images": [images[1]]}],
        [{"role": "user", "content": "Two?", "images": []}],
    ]
