"""Chat for NaViL: `model.chat` and `model.batch_chat` (API.md), kept out of the model class.

`NaViLChatMixin` is a base of `NaViLForConditionalGeneration`; it needs only what every transformers
generative model has (`generate`, `config`, `generation_config`, `device`, `dtype`) and the processor.
It turns the question, history and system message into a conversation and gets the model inputs from
the processor's `encode_conversation` (the one path: image placement and the user-text-is-text rule are
stated there), streams through transformers' `TextIteratorStreamer` on a thread, and answers batches
with left padding. `stream=True` returns a `ChatStream`: an iterator of text pieces that, once it ends,
holds the whole `response` and, with `return_history=True`, the new `history`. A prompt that does not
fit the model's context (`text_config.max_position_embeddings`) is refused before generating;
`max_new_tokens` beyond what fits is capped, with one logged warning.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils import logging

logger = logging.get_logger(__name__)

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

        User text is text and images are placed as `processor.encode_conversation` states (the question,
        the system message and both sides of every history turn are user text; images come only from
        `images=` or `pixel_values`, placed by the question's `<image>` under that rule -- the original
        form's rule for `pixel_values`).

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
        placement = processor.image_placement(question, num_images, original_form=original)
        prefix = processor.image_token + "\n"
        stored_question = prefix * num_images + question if placement == "prepend" else question
        turns = self._history_turns(history, processor)
        messages = self._chat_messages(turns, system_message)
        # The original form's images are already processed (pixel_values): they are only counted.
        messages.append({"role": "user", "content": question, "images": [None] * num_images if original else images})
        if original:
            if any(imgs for _, _, imgs in turns):
                raise ValueError("the original pixel_values= form cannot be combined with history that has images")
            layout = dict(image_grid_thw=grid, num_scales=num_scales, original_form=True)
            inputs = processor.encode_conversation(messages, True, return_tensors="pt", **layout)
            inputs["pixel_values"] = pixel_values
            inputs["image_grid_thw"] = grid
        else:
            inputs = processor.encode_conversation(messages, True, return_tensors="pt")
        if verbose:
            prompt, _ = processor.render_conversation(messages, True, original_form=original)
            print(processor.strip_literal_marks(prompt))
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)

        call = _call_kwargs(generate_kwargs)
        config = self._chat_generation_config(processor, generation_config, **generate_kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        self._fit_context(prompt_length, config)

        def finish(response: str):
            new_history = [*turns, (stored_question, response, images)]
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

        User text is text, as in `chat` (`processor.encode_conversation`). Returns one answer per question.
        Greedy answers equal `chat` called question by question; the context check and the `max_new_tokens`
        cap use the longest prompt.
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
        conversations = []
        for i, (question, sample) in enumerate(zip(questions, images)):
            try:
                processor.image_placement(question, len(sample))
            except ValueError as error:
                raise ValueError(f"sample {i}: {error}") from None
            user = {"role": "user", "content": question, "images": sample}
            conversations.append([*self._chat_messages([], system_message), user])
        inputs = processor.encode_conversation(
            conversations, True, padding=True, padding_side="left", return_tensors="pt"
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
    def _chat_messages(turns, system_message: str | None) -> list[dict]:
        """The conversation before the new question, as `processor.encode_conversation` takes it."""
        messages = []
        if system_message is not None:
            if not isinstance(system_message, str):
                raise TypeError(f"system_message must be a string, got {type(system_message).__name__}")
            messages.append({"role": "system", "content": system_message})
        for question, answer, images in turns:
            messages += [
                {"role": "user", "content": question, "images": images},
                {"role": "assistant", "content": answer},
            ]
        return messages

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
        -- for a processor without `encode_conversation` (an older NaViL processor file,
        another class) -- a `NaViLProcessor` with its image processor, tokenizer and chat template."""
        if hasattr(processor_or_tokenizer, "image_processor"):
            processor = processor_or_tokenizer
            if hasattr(processor, "encode_conversation"):
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
    def _history_turns(history, processor) -> list[tuple[str, str, list]]:
        """`(question, answer, images)` per history turn, checked: the images can be placed by the
        processor's rule (`image_placement`)."""
        turns = []
        for i, turn in enumerate(history or []):
            if isinstance(turn, (str, bytes)) or len(turn) not in (2, 3):
                raise ValueError(f"history turn {i} must be (question, answer) or (question, answer, images)")
            question, answer = turn[0], turn[1]
            if not isinstance(question, str) or not isinstance(answer, str):
                raise TypeError(f"history turn {i}: question and answer must be strings")
            placeholder = processor.image_token
            images = [] if len(turn) == 2 else NaViLChatMixin._image_list(turn[2])
            try:
                if len(turn) == 2 and question.lstrip().startswith(placeholder):  # the original's text-only pairs
                    raise ValueError("a (question, answer) pair is text only")
                processor.image_placement(question, len(images))
            except ValueError:
                raise ValueError(
                    f"history turn {i} has {question.count(placeholder)} {placeholder} placeholders but "
                    f"{len(images)} images; pass the history returned by chat(..., return_history=True), whose turns "
                    "are (question, answer, images)"
                ) from None
            turns.append((question, answer, images))
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
