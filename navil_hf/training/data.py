"""Training data: conversations in JSONL, encoded by the processor's `encode_conversation`, as `model.chat` is.

Two record formats, one per line (`format: auto` tells them apart):

* the transformers chat format::

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/1.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

  `content` is a string or a list of items; an image item names its file with `path` (or `image`, `url`
  for a local path). A user message's images go ahead of its text (`<image>\\n` each), as
  `processor.apply_chat_template` places them; its text is user text (a typed `<image>` is text).
* the LLaVA / InternVL format::

    {"image": "img/1.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                             {"from": "gpt", "value": "A cat."}]}

  `image` is a path or a list; the `<image>` placeholders of the human turns take the images in order
  (none at all: they all go in front of the first human turn, as InternVL does), placed as `model.chat`
  places a question's images.

Image paths are relative to the JSONL file. The processor's `encode_conversation` (where placement and the
user-text-is-text rule are stated) renders the conversation with its chat template (the default system
message included when there is none, as in `chat`) and processes and lays out the images; the labels are the
assistant turns' tokens (each ending with its end-of-turn token), found as the tokens that rendering
the conversation up to the turn adds after rendering it up to the turn's generation prompt
(`train_on: all` labels every token but the image layout's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from ..errors import UsageError
from .collate import IGNORE_INDEX

logger = logging.get_logger("navil_hf.training")

FORMATS = ("auto", "chat", "llava")
TRAIN_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(UsageError):
    """A record that cannot be read: the message names the file and line (`navil train`: one line, exit 2)."""


class SkipSample(Exception):
    """A record that is valid but not trainable (too long, nothing to learn): skipped with a warning."""


@dataclass
class Conversation:
    """A parsed record: `messages` are `{"role", "text", "images"}` (the images of that message, in order;
    `text` keeps LLaVA placeholders); `where` is `file:line` for messages."""

    messages: list[dict]
    where: str = ""
    placeholders: bool = False  # LLaVA: the text's own `<image>` placeholders place the images
    images: list[str] = field(default_factory=list)


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """`(line number, record)` for every non-blank line of a JSONL file, read lazily."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, _json_object(line, f"{path}:{number}")


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return record


def record_format(record: dict, where: str = "") -> str:
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "llava"
    raise DataError(f"{where}: a record needs 'messages' (chat format) or 'conversations' (LLaVA format)")


def _image_path(value, base_dir: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: an image must be a file path, got {value!r}")
    if value.startswith(("http://", "https://")):
        raise DataError(f"{where}: image {value!r} is a URL; download it and name the local file")
    path = Path(value.removeprefix("file://")).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    return str(path)


def _chat_content(content, base_dir: Path, where: str) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise DataError(f"{where}: message content must be a string or a list of items")
    texts, images = [], []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise DataError(f"{where}: a text item needs a string 'text'")
            texts.append(item["text"])
        elif kind == "image":
            source = next((item[k] for k in ("path", "image", "url") if k in item), None)
            images.append(_image_path(source, base_dir, where))
        else:
            raise DataError(f"{where}: unsupported content item {item!r} (text and image items only)")
    return "".join(texts), images


def parse_record(record: dict, base_dir, fmt: str = "auto", where: str = "") -> Conversation:
    """A record (either format) as a `Conversation`; image paths resolved against `base_dir`."""
    base_dir = Path(base_dir)
    fmt = record_format(record, where) if fmt == "auto" else fmt
    if fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise DataError(f"{where}: 'messages' must be a list")
        parsed = []
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise DataError(f"{where}: every message needs a role of {', '.join(ROLES)}")
            text, images = _chat_content(message.get("content"), base_dir, where)
            if images and message["role"] != "user":
                raise DataError(f"{where}: images are allowed in user messages only")
            parsed.append({"role": message["role"], "text": text, "images": images})
        conversation = Conversation(parsed, where)
    elif fmt == "llava":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list")
        images = record.get("image", record.get("images")) or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise DataError(f"{where}: 'image' must be a path or a list of paths")
        images = [_image_path(image, base_dir, where) for image in images]
        parsed = []
        for turn in turns:
            role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: every turn needs 'from' (human, gpt or system) and a string 'value'")
            parsed.append({"role": role, "text": turn["value"], "images": []})
        conversation = Conversation(parsed, where, placeholders=True, images=images)
        _place_llava_images(conversation)
    else:
        raise DataError(f"unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
    _check_turns(conversation)
    return conversation


def _place_llava_images(conversation: Conversation):
    from processing_navil import IMAGE_PLACEHOLDER

    users = [m for m in conversation.messages if m["role"] == "user"]
    counts = [m["text"].count(IMAGE_PLACEHOLDER) for m in users]
    images = list(conversation.images)
    if images and sum(counts) == 0:  # no placeholders: all images go with the first question (in front of it)
        counts = [len(images)] + [0] * (len(users) - 1)
    elif sum(counts) != len(images):
        raise DataError(
            f"{conversation.where}: {len(images)} images but {sum(counts)} {IMAGE_PLACEHOLDER} placeholders in the "
            "human turns"
        )
    for message, count in zip(users, counts):
        message["images"], images = images[:count], images[count:]


def _check_turns(conversation: Conversation):
    roles = [m["role"] for m in conversation.messages]
    if "assistant" not in roles:
        raise DataError(f"{conversation.where}: the conversation has no assistant turn to learn from")
    if "user" not in roles or roles.index("user") > roles.index("assistant"):
        raise DataError(f"{conversation.where}: the first assistant turn must follow a user turn")


class SampleEncoder:
    """Turns a `Conversation` into a training sample: `input_ids`, `labels`, `mm_token_type_ids` and,
    with images, `pixel_values`, `image_grid_thw`, `num_scales` (as the processor returns them, at its own
    settings: `navil train` makes `data.images` the processor's before encoding)."""

    def __init__(self, processor, *, train_on: str = "assistant", max_length: int | None = None):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        self.processor = processor
        self.train_on = train_on
        self.max_length = max_length
        from image_processing_navil import IMAGE_LAYOUT_TOKENS

        self.layout_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(IMAGE_LAYOUT_TOKENS)))

    @staticmethod
    def _messages(conversation: Conversation) -> list[dict]:
        """The conversation as `processor.encode_conversation` takes it: chat-format images as image items
        (ahead of the text), LLaVA's with the text that holds their placeholders."""
        if conversation.placeholders:
            return [{"role": m["role"], "content": m["text"], "images": m["images"]} for m in conversation.messages]
        return [
            {
                "role": m["role"],
                "content": [*({"type": "image", "image": i} for i in m["images"]), {"type": "text", "text": m["text"]}],
            }
            for m in conversation.messages
        ]

    def _ids(self, messages, layout, images: int, generation_prompt: bool) -> list[int]:
        """Token ids of `messages` (whose `images` images are the first ones of `layout`)."""
        grid, num_scales = layout
        kwargs = {}
        if images:
            rows = int(num_scales[:images].sum())
            kwargs = {"image_grid_thw": grid[:rows], "num_scales": num_scales[:images]}
        encoded = self.processor.encode_conversation(messages, generation_prompt, return_tensors=None, **kwargs)
        return encoded["input_ids"][0]

    def __call__(self, conversation: Conversation) -> dict:
        messages = self._messages(conversation)
        encoded = self.processor.encode_conversation(messages, return_tensors="pt")
        image_inputs = {key: encoded[key] for key in ("pixel_values", "image_grid_thw", "num_scales") if key in encoded}
        layout = (image_inputs.get("image_grid_thw"), image_inputs.get("num_scales"))
        input_ids = encoded["input_ids"][0]
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise SkipSample(f"{len(input_ids)} tokens, more than max_length {self.max_length}")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if self.train_on == "all":
            keep = ~torch.isin(input_ids, self.layout_ids)
            labels[keep] = input_ids[keep]
        else:
            seen_images = 0
            for i, message in enumerate(conversation.messages):
                if message["role"] != "assistant":
                    seen_images += len(message["images"])
                    continue
                start = _common_prefix(input_ids, self._ids(messages[:i], layout, seen_images, True))
                end = _common_prefix(input_ids, self._ids(messages[: i + 1], layout, seen_images, False))
                labels[start:end] = input_ids[start:end]
        if not (labels != IGNORE_INDEX).any():
            raise SkipSample("no tokens to learn from")
        sample = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": encoded["mm_token_type_ids"][0]}
        sample.update(image_inputs)
        return sample


def _common_prefix(ids: torch.Tensor, prefix: list[int]) -> int:
    n = min(len(ids), len(prefix))
    same = ids[:n] == torch.tensor(prefix[:n], dtype=ids.dtype)
    return n if bool(same.all()) else int((~same).nonzero()[0])


# ------------------------------------------------------------------------------------------------ datasets


class ConversationDataset(torch.utils.data.Dataset):
    """The records of one or more JSONL files, indexed by byte offset (nothing but the offsets is held;
    every record is parsed and encoded when it is asked for). A record that cannot be trained on (longer
    than `max_length`, no assistant tokens) is skipped with a warning naming it, and the next one is taken."""

    def __init__(self, paths, encoder: SampleEncoder, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r} (one of {', '.join(FORMATS)})")
        self.encoder, self.fmt = encoder, fmt
        self.index = []  # (path, line number, byte offset)
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            path = Path(path)
            if not path.is_file():
                raise DataError(f"{path}: no such data file")
            with open(path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self.index.append((path, number, offset))
                    offset += len(line)
        if not self.index:
            raise DataError(f"no records in {paths}")
        self.skipped = set()

    def __len__(self) -> int:
        return len(self.index)

    def record(self, i: int) -> tuple[dict, str, Path]:
        path, number, offset = self.index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline().decode("utf-8")
        where = f"{path}:{number}"
        return _json_object(line, where), where, path.parent

    def conversation(self, i: int) -> Conversation:
        record, where, base = self.record(i)
        return parse_record(record, base, self.fmt, where)

    def __getitem__(self, i: int) -> dict:
        for step in range(len(self)):
            j = (i + step) % len(self)
            conversation = self.conversation(j)
            try:
                return self.encoder(conversation)
            except SkipSample as reason:
                if j not in self.skipped:
                    self.skipped.add(j)
                    logger.warning(f"{conversation.where}: skipped ({reason})")
        raise DataError("every record was skipped (see the warnings): nothing to train on")


class StreamingConversationDataset(torch.utils.data.IterableDataset):
    """The records of JSONL files read as a stream (for sets too large to index), split between
    dataloader workers; skipped records are warned about. Training on it needs `max_steps`."""

    def __init__(self, paths, encoder: SampleEncoder, fmt: str = "auto"):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        for path in self.paths:
            if not path.is_file():
                raise DataError(f"{path}: no such data file")
        self.encoder, self.fmt = encoder, fmt

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        count = 0
        for path in self.paths:
            for number, record in read_jsonl(path):
                count += 1
                if worker is not None and count % worker.num_workers != worker.id:
                    continue
                conversation = parse_record(record, path.parent, self.fmt, f"{path}:{number}")
                try:
                    yield self.encoder(conversation)
                except SkipSample as reason:
                    logger.warning(f"{conversation.where}: skipped ({reason})")
