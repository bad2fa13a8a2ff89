"""Chat for NaViL: `model.chat` and `model.batch_chat` (API.md), kept out of the model class.

`NaViLChatMixin` is a base of `NaViLForConditionalGeneration`; it needs only what every transformers
generative model has (`generate`, `config`, `generation_config`, `device`, `dtype`) and the processor.
It builds prompts with the processor's chat template (history, system message, the original call form
with `pixel_values`), streams through transformers' `TextIteratorStreamer` on a thread, and answers
batches with left padding. `stream=True` returns a `ChatStream`: an iterator of text pieces that, once
it ends, holds the whole `response` and, with `return_history=True`, the new `history`.

User text is text. Every string a user supplies -- the question, the system message, both sides of
every history turn -- goes through the processor's `literal_text`: the control tokens typed in it
(`<image>`, `<IMG_CONTEXT>`, `<img>`, `<|im_start|>`, `<|im_end|>`, every added token of the tokenizer)
are tokenised as ordinary text, never as their token ids. Images are placed only by `images=` (or the
original form's `pixel_values`); a typed `<image>` marks where they go only under the rule in
`NaViLChatMixin.chat` (the original's `<image>` placeholders keep working), and is literal text
otherwise. A prompt that does not fit the model's context (`text_config.max_position_embeddings`) is
refused before generating; `max_new_tokens` beyond what fits is capped, with one logged warning.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# What the original prepends per image when the question has no placeholder.
IMAGE_PREFIX = IMAGE_PLACEHOLDER + "\n"
CHAT_SIGNATURE = (
    "model.chat(processor, question, images=None, history=None, return_history=False, generation_config=None, "
    "stream=False, system_message=None)"
)
ORIGINAL_CHAT_SIGNATURE = (
    "model.chat(tokenizer, pixel_values, question, generation_config, history=None, return_history=False, "
    "num_patches_list=image_grid_thw, num_scales=...)"
)

# `generate` arguments that are objects, not generation settings: passed to `generate` as they are.
GENERATE_CALL_KWARGS = (
    "stopping_criteria",
    "logits_processor",
    "streamer",
    "assistant_model",
    "prefix_allowed_tokens_fn",
)


def _processor_class():
    """The sibling processing file, imported on first use (the model loads without it)."""
    try:
        from .processing_navil import NaViLProcessor
    except ImportError:
        from processing_navil import NaViLProcessor
    return NaViLProcessor


class _StopWhenSet(StoppingCriteria):
    """Ends generation (every row) once `event` is set: how a stream tells its generation thread to stop."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _call_kwargs(generate_kwargs: dict) -> dict:
    """Take the `generate` arguments that are objects (stopping criteria, logits processors...) out of
    `generate_kwargs`, which then holds generation settings only."""
    return {key: generate_kwargs.pop(key) for key in GENERATE_CALL_KWARGS if key in generate_kwargs}


def _image_placement(question: str, num_images: int, original: bool = False) -> str | None:
    """Where a turn's `num_images` images go (the rule `NaViLChatMixin.chat` documents): `"inline"` -- the
    question's first `num_images` `<image>` are the placeholders, any further ones literal text (all of
    them when there are no images) --, `"prepend"` -- the question has no `<image>`: one placeholder per
    image goes in front, as the original does --, or None when the question's `<image>` cannot be matched
    with the images."""
    count = question.count(IMAGE_PLACEHOLDER)
    if num_images == 0 or count == num_images:
        return "inline"
    if count == 0:
        return "prepend"
    if count > num_images and (original or question.startswith(IMAGE_PREFIX * num_images)):
        return "inline"
    return None


def _placed_question(processor, question: str, num_images: int, placement: str) -> tuple[str, str]:
    """(the question as the history keeps it, its prompt text): the placeholders chosen by `placement`
    stay placeholders, and everything else is user text, marked literal by `processor.literal_text`.
    The history's form gives the same placement again in a later turn."""
    if placement == "prepend":
        return IMAGE_PREFIX * num_images + question, IMAGE_PREFIX * num_images + processor.literal_text(question)
    parts = question.split(IMAGE_PLACEHOLDER, num_images) if num_images else [question]
    return question, IMAGE_PLACEHOLDER.join(processor.literal_text(part) for part in parts)


def _mismatch(num_images: int, question: str) -> str:
    count = question.count(IMAGE_PLACEHOLDER)
    return (
        f"{num_images} images given but the prompt has {count} {IMAGE_PLACEHOLDER} placeholders; write one "
        f"{IMAGE_PLACEHOLDER} per image, none (the images go first), or the {num_images} placeholders first, "
        f"then literal {IMAGE_PLACEHOLDER} text"
    )


class ChatStream:
    """What `chat(..., stream=True)` returns: iterate it for the answer's text pieces. Once it ends --
    exhausted, or stopped early with `close()` -- `response` is the answer (stripped; the text so far
    after `close()`) and, with `return_history=True`, `history` is the conversation including this turn,
    as `chat(..., return_history=True)` returns it; both are None before. An exception inside generation
    is raised from the iteration (and leaves both None)."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces, self._finish, self._text = pieces, finish, []
        self._failed = False
        self.response = self.history = None

    def __iter__(self):
        return self

    def close(self):
        """Stop early: generation is told to stop and its thread is joined (also when the stream is
        garbage-collected); `response` and `history` then hold the answer so far."""
        self._pieces.close()
        self._end()

    def _end(self):
        if self.response is None and not self._failed:
            result = self._finish("".join(self._text).strip())
            self.response, self.history = result if isinstance(result, tuple) else (result, None)

    def __next__(self) -> str:
        try:
            piece = next(self._pieces)
        except StopIteration:
            self._end()
            raise
        except BaseException:
            self._failed = True
            raise
        self._text.append(piece)
        return piece


class NaViLChatMixin:
    """`chat` and `batch_chat` for a NaViL generative model (API.md "Chat")."""

    def chat(self, processor, *args, **kwargs):
        """Chat about images (API.md).

        New form: `chat(processor, question, images=None, history=None, return_history=False,
        generation_config=None, stream=False, system_message=None)`.

        Original OpenGVLab form, unchanged: `chat(tokenizer, pixel_values, question, generation_config,
        history=None, return_history=False, num_patches_list=image_grid_thw, num_scales=...)`
        (positional or keyword).

        Returns the answer (str); with `return_history=True`, `(answer, history)`; with `stream=True`, a
        `ChatStream` of text pieces whose `response` (and, with `return_history=True`, `history`) is
        filled when it ends. History turns are `(question, answer, images)`; `(question, answer)` pairs
        (the original's format) are text-only turns.

        User text is text: the question, the system message and both sides of every history turn are
        passed through `processor.literal_text`, so control tokens typed there (`<|im_start|>`,
        `<|im_end|>`, `<IMG_CONTEXT>`, `<img>`, every added token) tokenise as ordinary text and never
        forge a turn, an image slot or a visual-expert token. Images come only from `images=` (or
        `pixel_values`); `<image>` typed in a question marks where they go as follows, for a turn with
        n images (any other `<image>` is literal text):

        * n = 0 (text only): every `<image>` is literal text.
        * no `<image>` in the question: the n images go first (`<image>\\n` each), as the original does.
        * exactly n `<image>`: they are the placeholders, in order.
        * more than n: the first n are placeholders when the question starts with them (`<image>\\n` x n,
          the form to use for literal `<image>` text alongside images); in the original form the first n
          wherever they are, as the original replaces them.
        * otherwise (between 1 and n-1, or more than n not at the start): ValueError.

        `(question, answer)` history pairs are the original's text-only history: a question that starts
        with `<image>` there lost its images (ValueError); elsewhere `<image>` is literal. Turns returned
        by `return_history=True` keep their placement when sent back.

        The prompt must fit the model's context (`config.text_config.max_position_embeddings`): a longer
        one is a ValueError before generating, and `max_new_tokens` beyond what is left is capped to it
        (logged once per model).
        """
        if args and (args[0] is None or torch.is_tensor(args[0])):
            names = ("pixel_values", "question", "generation_config", "history", "return_history", "num_patches_list")
        else:
            names = ("question", "images", "history", "return_history", "generation_config")
        if len(args) > len(names):
            raise TypeError(f"chat() takes at most {len(names) + 1} positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"chat() got multiple values for argument {name!r}")
            kwargs[name] = value
        if "question" not in kwargs:
            raise TypeError(f"chat() needs a question: {CHAT_SIGNATURE}, or the original {ORIGINAL_CHAT_SIGNATURE}")
        question = kwargs["question"]
        if question is not None and not isinstance(question, str):
            raise TypeError(f"chat() question must be a string, got {type(question).__name__}: {CHAT_SIGNATURE}")
        if question is None or not question.strip():
            raise ValueError(f"chat() needs a non-empty question, got {question!r}: {CHAT_SIGNATURE}")
        return self._chat(processor, **kwargs)

    def _chat(
        self,
        processor,
        question: str,
        images=None,
        history=None,
        return_history: bool = False,
        generation_config=None,
        stream: bool = False,
        system_message: str | None = None,
        pixel_values: torch.Tensor | None = None,
        num_patches_list=None,
        num_scales=None,
        anyres_image_size: bool = True,
        verbose: bool = False,
        **generate_kwargs,
    ):
        processor = self._as_processor(processor)
        if pixel_values is not None and images is not None:
            raise ValueError("pass either images= or the original pixel_values=, not both")
        images = self._image_list(images)
        original = pixel_values is not None
        if original:
            grid, num_scales = self._original_image_layout(num_patches_list, num_scales)
            num_images = len(num_scales)
        else:
            num_images = len(images)
        placement = _image_placement(question, num_images, original=original)
        if placement is None:
            raise ValueError(_mismatch(num_images, question))
        stored_question, prompt_question = _placed_question(processor, question, num_images, placement)
        turns = self._history_turns(history, processor)
        prompt = self._chat_prompt(processor, prompt_question, turns, system_message)
        history_images = [img for _, _, imgs, _, _ in turns for img in imgs]

        if original:
            if history_images:
                raise ValueError("the original pixel_values= form cannot be combined with history that has images")
            inputs = processor.from_image_layout(
                prompt, image_grid_thw=grid, num_scales=num_scales, return_tensors="pt"
            )
            inputs["pixel_values"] = pixel_values
            inputs["image_grid_thw"] = grid
        else:
            all_images = history_images + images
            inputs = processor(text=[prompt], images=[all_images] if all_images else None, return_tensors="pt")
        if verbose:
            print(processor.strip_literal_marks(prompt))
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)

        call = _call_kwargs(generate_kwargs)
        config = self._chat_generation_config(processor, generation_config, **generate_kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        self._fit_context(prompt_length, config)

        def finish(response: str):
            new_history = [(q, a, imgs) for q, a, imgs, _, _ in turns] + [(stored_question, response, images)]
            return (response, new_history) if return_history else response

        if stream:
            return ChatStream(self._stream(processor, inputs, config, call), finish)
        output = self.generate(**inputs, generation_config=config, **call)
        response = processor.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True).strip()
        return finish(response)

    def batch_chat(
        self,
        processor,
        questions: list[str],
        images=None,
        generation_config=None,
        system_message: str | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Answer several independent questions in one left-padded batch (API.md).

        Args:
            processor: the checkpoint's processor (or its tokenizer).
            questions: one non-empty question per sample.
            images: `None`, or one list of images per question (`[[img1], [img2, img3], []]`); each
                question's `<image>` follow `chat`'s rule (none: its images go first).
            generation_config: a dict or `GenerationConfig`; greedy decoding by default.
            system_message: overrides the checkpoint's default system message for every sample.

        User text is text, as in `chat`. Returns one answer per question. Greedy answers equal `chat`
        called question by question; the context check and the `max_new_tokens` cap use the longest prompt.
        """
        if isinstance(questions, str) or not questions:
            raise ValueError("batch_chat() needs a non-empty list of questions")
        for i, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"batch_chat() question {i} must be a non-empty string, got {question!r}")
        if images is None:
            images = [[] for _ in questions]
        images = [self._image_list(sample) for sample in images]
        if len(images) != len(questions):
            raise ValueError(f"batch_chat() got {len(questions)} questions but {len(images)} image lists")
        processor = self._as_processor(processor)
        prompts = []
        for i, (question, sample) in enumerate(zip(questions, images)):
            placement = _image_placement(question, len(sample))
            if placement is None:
                raise ValueError(f"sample {i}: {_mismatch(len(sample), question)}")
            _, prompt_question = _placed_question(processor, question, len(sample), placement)
            prompts.append(self._chat_prompt(processor, prompt_question, [], system_message))
        inputs = processor(
            text=prompts, images=images if any(images) else None, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        call = _call_kwargs(generate_kwargs)
        config = self._chat_generation_config(processor, generation_config, **generate_kwargs)
        self._fit_context(int(inputs["attention_mask"].sum(-1).max()), config)
        output = self.generate(**inputs, generation_config=config, **call)
        return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, prompt_length:]]

    @staticmethod
    def _image_list(images) -> list:
        """One turn's (or sample's) images as a list: `None` is none, a single image is one."""
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @staticmethod
    def _chat_prompt(processor, question: str, turns, system_message: str | None) -> str:
        """The prompt (with literal marks) for `question` (already placed and marked) after `turns`."""
        messages = []
        if system_message is not None:
            if not isinstance(system_message, str):
                raise TypeError(f"system_message must be a string, got {type(system_message).__name__}")
            messages.append({"role": "system", "content": processor.literal_text(system_message)})
        for _, _, _, old_question, old_answer in turns:
            messages += [{"role": "user", "content": old_question}, {"role": "assistant", "content": old_answer}]
        messages.append({"role": "user", "content": question})
        # String contents are taken as they are: every user string here is already placed and marked.
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _fit_context(self, prompt_length: int, config: GenerationConfig):
        """Refuse a prompt that does not fit the context (`text_config.max_position_embeddings`) and cap
        `max_new_tokens` (and `min_new_tokens`) to the positions left, before anything is generated."""
        limit = self.config.text_config.max_position_embeddings
        if prompt_length >= limit:
            raise ValueError(
                f"the prompt has {prompt_length} tokens but the model's context (text_config.max_position_embeddings) "
                f"is {limit}, with room for at least one new token needed: shorten the question, history or images"
            )
        room = limit - prompt_length
        if config.max_new_tokens is not None and config.max_new_tokens > room:
            if not getattr(self, "_navil_context_warned", False):
                self._navil_context_warned = True
                logger.warning(
                    f"max_new_tokens={config.max_new_tokens} does not fit: the prompt has {prompt_length} tokens and "
                    f"the model's context is {limit}; capped to {room} new tokens (logged once)"
                )
            config.max_new_tokens = room
            if config.min_new_tokens is not None and config.min_new_tokens > room:
                config.min_new_tokens = room

    def _stream(self, processor, inputs, config, call_kwargs) -> Iterator[str]:
        """Text pieces as `generate` produces them on a thread. However the consumer leaves (the end, an
        exception such as Ctrl-C, or closing the iterator early), generation is told to stop and the
        thread is joined: no generation keeps running behind the caller's back."""
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _StopWhenSet()
        criteria = StoppingCriteriaList([*call_kwargs.pop("stopping_criteria", []), stop])
        failure = []

        def run():
            try:
                self.generate(
                    **inputs, generation_config=config, streamer=streamer, stopping_criteria=criteria, **call_kwargs
                )
            except BaseException as error:  # noqa: BLE001 -- handed to the consumer below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.event.set()
            thread.join()
        if failure:
            raise failure[0]

    def _as_processor(self, processor_or_tokenizer):
        """The processor to use: the one given, a `NaViLProcessor` built on a tokenizer (`for_config`), or
        -- for a processor without user-text marking (`literal_text`: an older NaViL processor file,
        another class) -- a `NaViLProcessor` with its image processor, tokenizer and chat template."""
        if hasattr(processor_or_tokenizer, "image_processor"):
            processor = processor_or_tokenizer
            if hasattr(processor, "literal_text"):
                return processor
            return _processor_class()(
                image_processor=processor.image_processor,
                tokenizer=processor.tokenizer,
                chat_template=getattr(processor, "chat_template", None),
            )
        tokenizer = processor_or_tokenizer
        return _processor_class().for_config(self.config, tokenizer, getattr(tokenizer, "chat_template", None))

    @staticmethod
    def _original_image_layout(num_patches_list, num_scales):
        """The original form's image layout; the processor checks `num_scales` against the grid rows
        and the vision encoder checks the grid against `pixel_values`."""
        if num_patches_list is None:
            raise ValueError("the original chat form needs num_patches_list=image_grid_thw with pixel_values")
        grid = torch.as_tensor(num_patches_list, dtype=torch.long).reshape(-1, 3)
        if num_scales is None:
            num_scales = [grid.shape[0]]  # one image with every scale
        return grid, [int(s) for s in (num_scales.tolist() if torch.is_tensor(num_scales) else num_scales)]

    @staticmethod
    def _history_turns(history, processor) -> list[tuple[str, str, list, str, str]]:
        """`(question, answer, images, question's prompt text, answer's prompt text)` per history turn:
        the images placed by `chat`'s rule, everything else marked literal."""
        turns = []
        for i, turn in enumerate(history or []):
            if isinstance(turn, (str, bytes)) or len(turn) not in (2, 3):
                raise ValueError(f"history turn {i} must be (question, answer) or (question, answer, images)")
            question, answer = turn[0], turn[1]
            if not isinstance(question, str) or not isinstance(answer, str):
                raise TypeError(f"history turn {i}: question and answer must be strings")
            if len(turn) == 2:  # the original's (question, answer): text only
                images, placement = [], "inline"
                if question.lstrip().startswith(IMAGE_PLACEHOLDER):
                    placement = None
            else:
                images = NaViLChatMixin._image_list(turn[2])
                placement = _image_placement(question, len(images))
            if placement is None:
                raise ValueError(
                    f"history turn {i} has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders but "
                    f"{len(images)} images; pass the history returned by chat(..., return_history=True), whose turns "
                    "are (question, answer, images)"
                )
            _, prompt_question = _placed_question(processor, question, len(images), placement)
            turns.append((question, answer, images, prompt_question, processor.literal_text(answer)))
        return turns

    def _chat_generation_config(self, processor, generation_config, **overrides) -> GenerationConfig:
        base = self.generation_config.to_dict() if self.generation_config is not None else {}
        if isinstance(generation_config, GenerationConfig):
            generation_config = generation_config.to_diff_dict()
        base.update(generation_config or {})
        base.update(overrides)
        tokenizer = processor.tokenizer
        # The original templates end a turn with <|im_end|>; an LLM's own template with its eos token.
        end = tokenizer.get_vocab().get("<|im_end|>", tokenizer.eos_token_id)
        base.setdefault("max_new_tokens", 1024)
        if base.get("eos_token_id") is None:
            base["eos_token_id"] = end
        if base.get("pad_token_id") is None:
            base["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        base.setdefault("do_sample", False)
        for key in ("transformers_version", "_from_model_config"):
            base.pop(key, None)
        return GenerationConfig(**base)


__all__ = ["ChatStream", "NaViLChatMixin"]
