"""Property-based (hypothesis) tests of user text: whatever a user types -- markup, control tokens, the
literal marks themselves, any Unicode -- the prompt holds exactly the control tokens the chat template
writes, nothing is routed to the visual experts, and the text decodes back as typed."""

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from configuration_navil import SPECIAL_TOKENS
from processing_navil import LITERAL_END, LITERAL_START, NaViLProcessor

from conftest import checkpoint
from tiny import tiny_model

MARKUP = [*SPECIAL_TOKENS, "<image>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "\n", " ", "system"]
TEXT = st.lists(
    st.one_of(st.sampled_from(MARKUP), st.text(max_size=6), st.sampled_from([LITERAL_START, LITERAL_END])),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def processor():
    model = tiny_model(vocab_size=396)
    return NaViLProcessor.for_config(model.config, AutoTokenizer.from_pretrained(checkpoint("qwen3")))


def _controls(processor, ids):
    added = processor.tokenizer.added_tokens_decoder
    return Counter(added[i].content for i in ids if i in added)


def _prompt(processor, system, question):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0]
    return inputs, (ids.tolist() if hasattr(ids, "tolist") else list(ids))


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(question=TEXT, system=TEXT)
def test_typed_text_never_becomes_control_tokens(processor, question, system):
    inputs, ids = _prompt(processor, system, question)

    # The template's own control tokens: those of the same conversation with harmless text.
    def harmless(typed):  # the marks a user types are dropped, so a text of marks only is empty
        return "x" if typed.replace(LITERAL_START, "").replace(LITERAL_END, "") else ""

    _, plain = _prompt(processor, harmless(system), harmless(question))
    assert _controls(processor, ids) == _controls(processor, plain)
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        flat = types[0].tolist() if hasattr(types[0], "tolist") else list(types[0])
        assert not any(flat)
    # What was typed comes back (the marks a user typed are dropped: they are not text).
    decoded = processor.tokenizer.decode(ids)
    for typed in (question, system):
        clean = typed.replace(LITERAL_START, "").replace(LITERAL_END, "")
        assert clean in decoded
