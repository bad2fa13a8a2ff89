"""Chat for NaViL: `model.chat` and `model.batch_chat` (API.md), kept out of the model class.

`NaViLChatMixin` is a base of `NaViLForConditionalGeneration`; it needs only what every transformers
generative model has (`generate`, `config`, `generation_config`, `device`, `dtype`) and the processor.
It builds prompts with the processor's chat template (history, system message, the original call form
with `pixel_values`), streams through transformers' `TextIteratorStreamer` on a thread, and answers
batches with left padding. `stream=True` returns a `ChatStream`: an iterator of text pieces that, once
exhausted, holds the whole `response` and, with `return_history=True`, the new `history`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

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
    """What `chat(..., stream=True)` returns: iterate it for the answer's text pieces. Once it is
    exhausted, `response` is the whole answer (stripped) and, with `return_history=True`, `history` is
    the conversation including this turn. An exception inside generation is raised from the iteration;
    `close()` stops early."""

    def __init__(self, pieces: Iterator[str], finish):
        self._pieces, self._finish, self._text = pieces, finish, []
        self.response = self.history = None

    def __iter__(self):
        return self

    def close(self):
        """Stop early: generation is told to stop and its thread is joined (also when the stream is
        garbage-collected)."""
        self._pieces.close()

    def __next__(self) -> str:
        try:
            piece = next(self._pieces)
        except StopIteration:
            if self.response is None:
                result = self._finish("".join(self._text).strip())
                self.response, self.history = result if isinstance(result, tuple) else (result, None)
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
        if question is None:
            raise ValueError("chat() needs a question")
        processor = self._as_processor(processor)
        if pixel_values is not None and images is not None:
            raise ValueError("pass either images= or the original pixel_values=, not both")
        images = self._image_list(images)
        if pixel_values is not None:
            grid, num_scales = self._original_image_layout(num_patches_list, num_scales)
            num_images = len(num_scales)
        else:
            num_images = len(images)
        question = self._with_placeholders(question, num_images)
        turns = self._history_turns(history)
        prompt = self._chat_prompt(processor, question, turns, system_message)
        history_images = [img for _, _, imgs in turns for img in imgs]

        if pixel_values is not None:
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
            print(prompt)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)

        call = _call_kwargs(generate_kwargs)
        config = self._chat_generation_config(processor, generation_config, **generate_kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        self._check_context(prompt_length)

        def finish(response: str):
            new_history = [(q, a, imgs) for q, a, imgs in turns] + [(question, response, images)]
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
            questions: one question per sample.
            images: `None`, or one list of images per question (`[[img1], [img2, img3], []]`); a question
                without `<image>` placeholders gets its images prepended, as in `chat`.
            generation_config: a dict or `GenerationConfig`; greedy decoding by default.
            system_message: overrides the checkpoint's default system message for every sample.

        Returns one answer per question. Greedy answers equal `chat` called question by question.
        """
        if isinstance(questions, str) or not questions:
            raise ValueError("batch_chat() needs a non-empty list of questions")
        if images is None:
            images = [[] for _ in questions]
        images = [self._image_list(sample) for sample in images]
        if len(images) != len(questions):
            raise ValueError(f"batch_chat() got {len(questions)} questions but {len(images)} image lists")
        processor = self._as_processor(processor)
        prompts = [
            self._chat_prompt(processor, self._with_placeholders(question, len(sample)), [], system_message)
            for question, sample in zip(questions, images)
        ]
        inputs = processor(
            text=prompts, images=images if any(images) else None, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        self._check_context(int(inputs["attention_mask"].sum(-1).max()))
        call = _call_kwargs(generate_kwargs)
        config = self._chat_generation_config(processor, generation_config, **generate_kwargs)
        output = self.generate(**inputs, generation_config=config, **call)
        return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, prompt_length:]]

    @staticmethod
    def _image_list(images) -> list:
        """One turn's (or sample's) images as a list: `None` is none, a single image is one."""
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @staticmethod
    def _with_placeholders(question: str, num_images: int) -> str:
        """The question with one `<image>` per image, prepended as the original does unless it has them."""
        if num_images and "<image>" not in question:
            return "<image>\n" * num_images + question
        return question

    @staticmethod
    def _chat_prompt(processor, question: str, turns, system_message: str | None) -> str:
        messages = []
        if system_message is not None:
            messages.append({"role": "system", "content": system_message})
        for old_question, old_answer, _ in turns:
            messages += [{"role": "user", "content": old_question}, {"role": "assistant", "content": old_answer}]
        messages.append({"role": "user", "content": question})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _check_context(self, prompt_length: int):
        limit = self.config.text_config.max_position_embeddings
        if prompt_length >= limit:
            raise ValueError(f"the prompt has {prompt_length} tokens but the model's context is {limit}")

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
        if hasattr(processor_or_tokenizer, "image_processor"):
            return processor_or_tokenizer
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
    def _history_turns(history) -> list[tuple[str, str, list]]:
        turns = []
        for i, turn in enumerate(history or []):
            if len(turn) == 2:
                question, answer, images = turn[0], turn[1], []
            elif len(turn) == 3:
                question, answer, images = turn
            else:
                raise ValueError(f"history turn {i} must be (question, answer) or (question, answer, images)")
            placeholders = question.count("<image>")
            if placeholders != len(images):
                raise ValueError(
                    f"history turn {i} has {placeholders} <image> placeholders but {len(images)} images; "
                    "pass the history returned by chat(..., return_history=True)"
                )
            turns.append((question, answer, list(images)))
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
