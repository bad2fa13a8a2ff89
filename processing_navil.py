"""Processor for NaViL: chat templates, `<image>` expansion into the visual token layout, tokenisation.

* `CHAT_TEMPLATES` -- Jinja versions of the original `qwen3-chat` and `internlm2-chat` conversation
  templates (ChatML without a newline after `<|im_end|>`, the original default system message, Qwen3's
  empty `<think>` block at the start of every assistant turn). `{"type": "image"}` content items render
  as `<image>\\n` ahead of the text, as the original prepends them.
* `NaViLProcessor` -- `encode_conversation` is the one path from a conversation (turns with text and
  images, a system message, the generation prompt) to model inputs: it places the images, keeps every
  piece of user text literal (the rule is stated there, once) and expands every `<image>` placeholder
  into the image's tokens (`image_processing_navil.image_tokens`, SPEC.md §3); tokenises; marks the
  visual-expert tokens (`<IMG_CONTEXT>`, `<img>`) in `mm_token_type_ids`. `model.chat`, `batch_chat`,
  training data and the vLLM processor use it or its building blocks (`user_text`, `literal_text`,
  `image_placement`, `image_tokens`).
* `save_processor` -- writes a folder that `AutoProcessor.from_pretrained(dir, trust_remote_code=True)`
  loads (auto_map entries, code files, tokenizer, chat template).
"""

import functools
import json
import os
import re

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput

try:
    from .compat_navil import (
        CONTROL_TOKEN_END,
        CONTROL_TOKEN_START,
        IMAGE_TOKEN_COUNT_INCLUDES_MARKERS,
        install_subprocessor_loader,
    )
    from .configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
        SPECIAL_TOKENS,
        VISUAL_EXPERT_TOKENS,
    )
    from .image_processing_navil import NaViLImageProcessor, NaViLImagesKwargs, flatten_images, image_tokens
except ImportError:  # imported as a top-level module (tests, scripts next to the file)
    from compat_navil import (
        CONTROL_TOKEN_END,
        CONTROL_TOKEN_START,
        IMAGE_TOKEN_COUNT_INCLUDES_MARKERS,
        install_subprocessor_loader,
    )
    from configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
        SPECIAL_TOKENS,
        VISUAL_EXPERT_TOKENS,
    )
    from image_processing_navil import NaViLImageProcessor, NaViLImagesKwargs, flatten_images, image_tokens

IMAGE_PLACEHOLDER = "<image>"
# What the original prepends per image when a question has no placeholder (SPEC §3).
IMAGE_PREFIX = IMAGE_PLACEHOLDER + "\n"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# The marks `NaViLProcessor.literal_text` puts around control tokens in user text (the rule:
# `NaViLProcessor.encode_conversation`): the private-use characters transformers' own
# `sanitize_control_tokens` (5.23+) uses. Marks never reach `input_ids`.
LITERAL_START, LITERAL_END = CONTROL_TOKEN_START, CONTROL_TOKEN_END
# A placeholder / an <IMG_CONTEXT> that is not marked user text.
_UNMARKED = f"(?<!{re.escape(LITERAL_START)})"
_PLACEHOLDER_RE = re.compile(_UNMARKED + re.escape(IMAGE_PLACEHOLDER))
_CONTEXT_TOKEN_RE = re.compile(_UNMARKED + re.escape(IMAGE_CONTEXT_TOKEN))
# Splits a prompt into [plain, marked, plain, marked, ..., plain]; a lone mark splits with None as its span.
_MARKS_RE = re.compile(f"{LITERAL_START}([^{LITERAL_START}{LITERAL_END}]*){LITERAL_END}|[{LITERAL_START}{LITERAL_END}]")
# Tokenizer arguments the marked-text path implements itself (the others it refuses when set).
_MARKED_TEXT_KWARGS = (
    "add_special_tokens", "padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of",
    "return_attention_mask", "verbose",
)  # fmt: skip
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

# One template body for both; `think` adds Qwen3's empty reasoning block to every assistant turn.
# Every emitted newline is an explicit `{{ "\n" }}` so rendering does not depend on trim_blocks /
# lstrip_blocks. Variables: `default_system_message` overrides the built-in one; a system message with
# empty content means no system block at all.
_TEMPLATE = r"""{%- set think = __THINK__ -%}
{%- if default_system_message is defined -%}
    {%- set default_system = default_system_message -%}
{%- else -%}
    {%- set default_system = __DEFAULT_SYSTEM__ -%}
{%- endif -%}
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item.type == 'image' -%}
                {{- '<image>\n' -}}
            {%- elif item.type != 'text' -%}
                {{- raise_exception('unsupported content type: ' ~ item.type) -}}
            {%- endif -%}
        {%- endfor -%}
        {%- for item in content -%}
            {%- if item.type == 'text' -%}
                {{- item.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system = render(messages[0].content) -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if system -%}
    {{- '<|im_start|>system\n' + system + '<|im_end|>' -}}
{%- endif -%}
{%- for message in turns -%}
    {%- if message.role == 'user' -%}
        {{- '<|im_start|>user\n' + render(message.content) + '<|im_end|>' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if think -%}
            {{- '<think>\n\n</think>\n\n' -}}
        {%- endif -%}
        {%- generation -%}
            {{- render(message.content) + '<|im_end|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('unsupported role: ' ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if think -%}
        {{- '<think>\n\n</think>\n\n' -}}
    {%- endif -%}
{%- endif -%}
"""
_TEMPLATE = _TEMPLATE.replace("__DEFAULT_SYSTEM__", json.dumps(DEFAULT_SYSTEM_MESSAGE, ensure_ascii=False))
CHAT_TEMPLATES = {
    "qwen3-chat": _TEMPLATE.replace("__THINK__", "true"),
    "internlm2-chat": _TEMPLATE.replace("__THINK__", "false"),
}

# Put in front of a text-only LLM's own chat template (`extend_chat_template`): messages whose content is
# a list of items become plain-text messages, every `{"type": "image"}` item an `<image>\n` ahead of the
# text (as in the original templates); other keys of the message are kept. The LLM's template then
# renders the conversation exactly as it would for text.
_IMAGE_PRELUDE = r"""{#- navil: image items -> <image> placeholders -#}
{%- set _navil = namespace(messages=[]) -%}
{%- for message in messages -%}
    {%- if message.content is string or message.content is none -%}
        {%- set _navil.messages = _navil.messages + [message] -%}
    {%- else -%}
        {%- set _text = namespace(images='', text='') -%}
        {%- for item in message.content -%}
            {%- if item.type == 'image' -%}
                {%- set _text.images = _text.images + '<image>\n' -%}
            {%- elif item.type == 'text' -%}
                {%- set _text.text = _text.text + item.text -%}
            {%- else -%}
                {{- raise_exception('unsupported content type: ' ~ item.type) -}}
            {%- endif -%}
        {%- endfor -%}
        {%- set _navil.messages = _navil.messages + [dict(message, content=_text.images + _text.text)] -%}
    {%- endif -%}
{%- endfor -%}
{%- set messages = _navil.messages -%}
{#- navil: end -#}
"""


def extend_chat_template(template):
    """A text-only LLM's chat template, extended for images: `{"type": "image"}` content items render
    as `<image>\n` ahead of the message's text (the processor expands each into the image's tokens);
    everything else renders exactly as the LLM's own template does. Idempotent."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("extend_chat_template needs the LLM's chat template (a non-empty Jinja string)")
    if template.startswith(_IMAGE_PRELUDE):
        return template
    return _IMAGE_PRELUDE + template


def image_placeholder_expansion(grids, merge_size=2):
    """The text one `<image>` becomes, given the image's `image_grid_thw` rows (smallest scale first):
    `image_tokens` as a string."""
    return "".join(image_tokens(grids, merge_size))


def image_placement(text: str, num_images: int, original_form: bool = False) -> str:
    """Where the `num_images` images of a user turn go, given its `text` (the rule is stated in
    `NaViLProcessor.encode_conversation`): `"inline"` -- the text's first `num_images` `<image>` are the
    placeholders, any further ones literal text (all of them with no images) -- or `"prepend"` -- the text
    has no `<image>`: one `<image>\\n` per image goes in front, as the original does. A ValueError when
    the text's `<image>` cannot be matched with the images."""
    count = text.count(IMAGE_PLACEHOLDER)
    if num_images == 0 or count == num_images:
        return "inline"
    if count == 0:
        return "prepend"
    if count > num_images and (original_form or text.startswith(IMAGE_PREFIX * num_images)):
        return "inline"
    raise ValueError(
        f"{num_images} images given but the prompt has {count} {IMAGE_PLACEHOLDER} placeholders; write one "
        f"{IMAGE_PLACEHOLDER} per image, none (the images go first), or the {num_images} placeholders first, "
        f"then literal {IMAGE_PLACEHOLDER} text"
    )


@functools.lru_cache(maxsize=16)
def _control_tokens_re(tokens: tuple) -> re.Pattern:
    """A regex matching any of `tokens`, longest first (so a token wins over the tokens it contains)."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def strip_literal_marks(text: str) -> str:
    """`text` without the marks `NaViLProcessor.literal_text` puts around literal control tokens (for display)."""
    return text.replace(LITERAL_START, "").replace(LITERAL_END, "")


class NaViLProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of `NaViLProcessor.__call__`, routed by transformers' `_merge_kwargs`: flat
    (`padding=True`, `max_pixels=...`), per modality (`text_kwargs={...}`, `images_kwargs={...}`) or
    `common_kwargs={"return_tensors": "pt"}`. Text keys go to the tokenizer, image keys
    (`NaViLImagesKwargs`: `min_pixels`, `max_pixels`, `scale_downsample_ratio`, `multi_scale`, ...) to
    the image processor, `return_tensors` to both.

    Defaults: left padding; `padding` unset pads to the longest prompt when there are several and
    not at all for one (the tokenizer's own `padding_side` is not used)."""

    images_kwargs: NaViLImagesKwargs
    _defaults = {"text_kwargs": {"padding_side": "left"}}


@install_subprocessor_loader
class NaViLProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + chat template for NaViL.

    Args:
        image_processor: a `NaViLImageProcessor` (default settings when `None`).
        tokenizer: the checkpoint's tokenizer; it must carry the 12 special tokens and `<|im_start|>`,
            `<|im_end|>` as single tokens.
        chat_template: a Jinja template, or a name in `CHAT_TEMPLATES` (`"qwen3-chat"`, `"internlm2-chat"`).

    Token attributes: `image_token` is `"<image>"`, the placeholder that `__call__` expands (one per
    image; it is text, not a token of the vocabulary). `image_token_id` is the id of `<IMG_CONTEXT>`,
    the token repeated for every connector output (the model's `config.image_token_id`); it is also
    `image_context_token_id`, with `image_context_token = "<IMG_CONTEXT>"`. `image_token_ids` are the
    tokens marked 1 in `mm_token_type_ids` (`<IMG_CONTEXT>` and `<img>`, the visual-expert tokens).
    """

    valid_processor_kwargs = NaViLProcessorKwargs
    image_placeholder = IMAGE_PLACEHOLDER

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if tokenizer is None:
            raise ValueError("NaViLProcessor needs a tokenizer")
        if image_processor is None:
            image_processor = NaViLImageProcessor()
        if isinstance(chat_template, str) and chat_template in CHAT_TEMPLATES:
            chat_template = CHAT_TEMPLATES[chat_template]
        vocab = tokenizer.get_vocab()
        # The original ChatML templates need <|im_start|>/<|im_end|>; a template taken from the LLM
        # (`navil init-from-llm`) brings its own chat tokens.
        chatml = chat_template in CHAT_TEMPLATES.values()
        missing = [t for t in (*SPECIAL_TOKENS, *(CHAT_TOKENS if chatml else ())) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks tokens NaViL needs: {' '.join(missing)}")
        emitted = (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN, IMAGE_LINE_BREAK_TOKEN)
        emitted += (IMAGE_FRAME_BREAK_TOKEN,)
        split = [t for t in emitted if tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]]
        if split:
            raise ValueError(
                f"the tokenizer splits tokens NaViL needs whole (add them as special tokens): {' '.join(split)}"
            )
        self.image_token = IMAGE_PLACEHOLDER
        self.image_context_token = IMAGE_CONTEXT_TOKEN
        self.image_context_token_id = vocab[IMAGE_CONTEXT_TOKEN]
        self.image_token_id = self.image_context_token_id
        self.image_start_token_id = vocab[IMAGE_START_TOKEN]
        self.image_end_token_id = vocab[IMAGE_END_TOKEN]
        self.image_line_break_token_id = vocab[IMAGE_LINE_BREAK_TOKEN]
        self.image_frame_break_token_id = vocab[IMAGE_FRAME_BREAK_TOKEN]
        self.special_token_ids = [vocab[t] for t in SPECIAL_TOKENS]
        self.visual_expert_token_ids = [vocab[t] for t in VISUAL_EXPERT_TOKENS]
        self.im_end_token_id = vocab.get("<|im_end|>")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def for_config(cls, config, tokenizer, chat_template=None):
        """The processor a `NaViLConfig` implies: its image settings and, unless `chat_template` is
        given, the original chat template named by `config.template` -- or, for a model built from a
        text LLM (`config.template` None), the tokenizer's own template extended for images."""
        if chat_template is None:
            if config.template is None and getattr(tokenizer, "chat_template", None):
                chat_template = extend_chat_template(tokenizer.chat_template)
            elif config.template not in CHAT_TEMPLATES:
                raise ValueError(f"unknown chat template {config.template!r}; known: {', '.join(CHAT_TEMPLATES)}")
            else:
                chat_template = CHAT_TEMPLATES[config.template]
        image_processor = NaViLImageProcessor(
            patch_size=config.vision_config.patch_size,
            merge_size=config.vision_config.spatial_merge_size,
            min_dynamic_patch=config.min_dynamic_patch,
            max_dynamic_patch=config.max_dynamic_patch,
            scale_downsample_ratio=config.scale_downsample_ratio,
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    @classmethod
    def _load_subprocessors(cls, pretrained_model_name_or_path, **kwargs):
        """The sub-processors of a saved processor (`compat_navil.install_subprocessor_loader` makes
        `from_pretrained` call this on every supported transformers): those the caller passed as they are,
        the tokenizer as transformers loads it, the image processor as `NaViLImageProcessor` directly.
        transformers would go through `AutoImageProcessor`, which needs the class registered (or remote
        code) and, in transformers 5.16, torchvision."""
        given = {name: kwargs.pop(name) for name in cls.get_attributes() if kwargs.get(name) is not None}
        path, subfolder = pretrained_model_name_or_path, kwargs.pop("subfolder", "")
        loaded = {}
        for attribute in cls.get_attributes():
            if attribute in given:
                loaded[attribute] = given[attribute]
            elif attribute == "image_processor":
                loaded[attribute] = NaViLImageProcessor.from_pretrained(path, subfolder=subfolder, **kwargs)
            else:
                loaded[attribute] = cls._load_tokenizer_from_pretrained(attribute, path, subfolder=subfolder, **kwargs)
        return loaded

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", *self.image_processor.model_input_names]

    @property
    def image_token_ids(self):
        """The ids marked 1 in `mm_token_type_ids` (transformers' `create_mm_token_type_ids` reads this)."""
        return list(self.visual_expert_token_ids)

    # ------------------------------------------------------------------ user text is text
    def control_tokens(self) -> tuple:
        """The strings that `literal_text` keeps literal in user text: every added token of the tokenizer
        (special or not; whitespace-only ones aside), its special tokens and `chat_control_tokens`, NaViL's 12
        special tokens (`<IMG_CONTEXT>`, `<img>`, ...), the ChatML role markers `<|im_start|>` / `<|im_end|>`,
        and the `<image>` placeholder."""
        tokenizer = self.tokenizer
        tokens = {token.content for token in tokenizer.added_tokens_decoder.values()}
        tokens.update(getattr(tokenizer, "all_special_tokens", ()) or ())
        tokens.update(getattr(tokenizer, "chat_control_tokens", None) or ())
        tokens = {t for t in tokens if isinstance(t, str) and t.strip()}
        tokens.update(SPECIAL_TOKENS, CHAT_TOKENS, (IMAGE_PLACEHOLDER,))
        return tuple(sorted(tokens))

    def literal_text(self, text: str) -> str:
        """`text` as user text (the rule: `encode_conversation`): every control token in it (`control_tokens()`)
        is wrapped in the private-use marks `LITERAL_START`/`LITERAL_END`. Marks already in `text` are dropped
        first, so user text cannot forge them. Text with no control token is returned unchanged."""
        if not isinstance(text, str):
            raise TypeError(f"literal_text() takes a string, got {type(text).__name__}")
        text = strip_literal_marks(text)
        return _control_tokens_re(self.control_tokens()).sub(lambda m: f"{LITERAL_START}{m.group()}{LITERAL_END}", text)

    strip_literal_marks = staticmethod(strip_literal_marks)
    image_placement = staticmethod(image_placement)

    def user_text(self, text: str, num_images: int = 0, original_form: bool = False) -> str:
        """The prompt text of a user's `text` with `num_images` images, placed by `image_placement`: the
        placeholders it picks stay placeholders (or `<image>\\n` per image go in front), everything else is
        `literal_text`. A ValueError when the text's `<image>` cannot be matched with the images."""
        if not isinstance(text, str):
            raise TypeError(f"user text must be a string, got {type(text).__name__}")
        if image_placement(text, num_images, original_form) == "prepend":
            return IMAGE_PREFIX * num_images + self.literal_text(text)
        parts = text.split(IMAGE_PLACEHOLDER, num_images) if num_images else [text]
        return IMAGE_PLACEHOLDER.join(self.literal_text(part) for part in parts)

    # ------------------------------------------------------------------ the one path: conversation -> inputs
    def encode_conversation(
        self,
        conversation,
        add_generation_prompt: bool = False,
        *,
        original_form: bool = False,
        image_grid_thw=None,
        num_scales=None,
        chat_template=None,
        **kwargs: Unpack[NaViLProcessorKwargs],
    ) -> BatchFeature:
        """Model inputs for a conversation: the one path from messages to ids (what `model.chat`,
        `batch_chat`, training data and `navil chat` use).

        Args:
            conversation: a list of messages, or a list of conversations (a batch, padded on the left).
                A message is `{"role": "system" | "user" | "assistant", "content": ..., "images": [...]}`:
                * `content` a string: user text with its own `images` (user messages only; optional),
                  placed by `image_placement` (below);
                * `content` a list of transformers content items: `{"type": "text", "text": ...}` and
                  `{"type": "image", "image" | "path" | "url": ...}`, rendered by `apply_chat_template` (the
                  images go ahead of the text, `<image>\\n` each); text items alone may take the message's `images`.
                Images: `PIL.Image`, file paths, numpy/torch HWC uint8 arrays (see `__call__`). A leading
                system message overrides the chat template's default one (empty: none).
            add_generation_prompt: end with the assistant turn's opening, for generation.
            original_form: the original `model.chat(tokenizer, pixel_values, ...)` placement rule (below).
            image_grid_thw, num_scales: the images are already processed (`pixel_values` not returned): the
                messages' images are then only counted, their items may be anything (`None`).
            chat_template: a template other than the processor's.
            **kwargs: as in `__call__` (`return_tensors`, `padding`, image settings, ...).

        Returns:
            `BatchFeature` as `__call__` returns it: `input_ids`, `attention_mask`, `mm_token_type_ids` and,
            with images, `pixel_values`, `image_grid_thw`, `num_scales`.

        User text is text (the rule, stated here once). Every string of the conversation -- each turn's
        text in any role, system message included -- goes through `literal_text`: the control tokens typed
        there (`control_tokens()`: `<image>`, `<IMG_CONTEXT>`, `<img>`, `<|im_start|>`, `<|im_end|>`, every
        added token of the tokenizer) are marked, and this processor tokenises a marked span as the ordinary
        text tokens of its characters (the tokenizer's `split_special_tokens`, split at the token's
        boundaries as a tokenizer without it would), never as the control token's id; a marked `<image>` is
        no placeholder. So user text never forges a turn, an image slot or a visual-expert token, and the
        model reads what was typed. Images are placed only by the messages' images, a turn with n images
        by `image_placement`:

        * n = 0 (text only): every `<image>` is literal text.
        * no `<image>` in the text: the n images go first (`<image>\\n` each), as the original does.
        * exactly n `<image>`: they are the placeholders, in order.
        * more than n: the first n are placeholders when the text starts with them (`<image>\\n` x n, the
          form to use for literal `<image>` text alongside images); with `original_form` the first n
          wherever they are, as the original replaces them.
        * otherwise (between 1 and n-1, or more than n not at the start): ValueError.

        Each `<image>` then expands into its image's tokens (`image_tokens`, SPEC.md §3). The prompt text
        is `render_conversation`.

        For transformers users: `apply_chat_template(messages, tokenize=True, return_dict=True)` gives the same
        inputs for conversations of content items (it takes a string `content` as prompt text in the
        original format, `<image>` there a placeholder); this method also takes string turns with their
        images, the original placement rule and already processed images, which `model.chat` and training
        need.
        """
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        rendered = [
            self.render_conversation(
                chat, add_generation_prompt, original_form=original_form, chat_template=chat_template
            )
            for chat in (conversation if batched else [conversation])
        ]
        prompts = [prompt for prompt, _ in rendered]
        if image_grid_thw is not None or num_scales is not None:
            return self.from_image_layout(prompts, image_grid_thw, num_scales, **kwargs)
        images = [sample for _, sample in rendered]
        return self(text=prompts, images=images if any(images) else None, **kwargs)

    def render_conversation(
        self, conversation, add_generation_prompt: bool = False, *, original_form=False, chat_template=None
    ) -> tuple[str, list]:
        """`(prompt, images)` of one conversation as `encode_conversation` takes it: the prompt text with
        the images' `<image>` placeholders and every piece of user text marked literal (`strip_literal_marks`
        for display), and the images in prompt order."""
        if not isinstance(conversation, (list, tuple)):
            raise TypeError(f"a conversation is a list of messages, got {type(conversation).__name__}")
        messages, images = [], []
        for i, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
            content, own = message.get("content"), list(message.get("images") or ())
            if own and message.get("role") != "user":
                raise ValueError(f"message {i}: images are allowed in user messages only")
            if isinstance(content, str):
                content = self.user_text(content, len(own), original_form)
            elif isinstance(content, (list, tuple)):
                items = _image_items(content, i)
                if own and items:
                    raise ValueError(f"message {i}: give its images as image items or as 'images', not both")
                own = own or items
                if own and not items:
                    content = [{"type": "image"} for _ in own] + list(content)
            else:
                raise TypeError(f"message {i}: content must be a string or a list of items, got {content!r}")
            images += own
            messages.append({**{k: v for k, v in message.items() if k != "images"}, "content": content})
        # String contents are placed and marked above; `apply_chat_template` marks the text items.
        prompt = self.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return prompt, images

    def apply_chat_template(self, conversation, chat_template=None, sanitize_control_tokens=None, **kwargs):
        """transformers' `ProcessorMixin.apply_chat_template`, with user text kept literal (the rule:
        `encode_conversation`, the one path to model inputs, which renders through this method).

        The text of content items (`{"type": "text", "text": ...}`, in any role: system, user, assistant) is
        user text (`literal_text`); images are placed only by `{"type": "image"}` items. A string `content` is a
        prompt fragment in the original format and is taken as it is (an `<image>` there is a placeholder),
        unless `sanitize_control_tokens=True`, which treats string contents as user text too;
        `sanitize_control_tokens=False` keeps content items raw as well.

        With `tokenize=False` the returned prompt carries the marks around literal control tokens
        (invisible private-use characters; a prompt without them is unchanged): give it to this processor
        (`processor(text=prompt, images=...)`), which honours them; `strip_literal_marks(prompt)` is the
        plain text for display.
        """
        if sanitize_control_tokens is not False:
            conversation = self._literal_conversation(conversation, strings=bool(sanitize_control_tokens))
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _literal_conversation(self, conversation, strings: bool):
        """The conversation (or batch of them) with its text items -- and, with `strings`, its string
        contents -- passed through `literal_text`; messages are copied, never changed in place."""

        def item(x):
            if isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str):
                return {**x, "text": self.literal_text(x["text"])}
            return x

        def message(m):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str) and strings:
                return {**m, "content": self.literal_text(content)}
            if isinstance(content, (list, tuple)):
                return {**m, "content": [item(x) for x in content]}
            return m

        if not isinstance(conversation, (list, tuple)):
            return conversation
        if conversation and isinstance(conversation[0], (list, tuple)):
            return [[message(m) for m in chat] for chat in conversation]
        return [message(m) for m in conversation]

    def _tokenize(self, texts, text_kwargs):
        """The tokenizer on `texts`; text with literal marks (`literal_text`) goes through `_tokenize_marked`."""
        if not any(LITERAL_START in t or LITERAL_END in t for t in texts):
            return self.tokenizer(texts, **text_kwargs)
        return self._tokenize_marked(texts, text_kwargs)

    def _tokenize_marked(self, texts, text_kwargs):
        """Tokenise prompts that carry literal marks: each marked span as ordinary text, the rest as usual,
        piece by piece; then the tokenizer's special tokens, truncation and padding as its own call does."""
        unsupported = sorted(
            k for k, v in text_kwargs.items() if k not in _MARKED_TEXT_KWARGS and v not in (None, False)
        )
        if unsupported:
            raise ValueError(
                f"text with literal control tokens (marked user text) cannot be tokenised with {', '.join(unsupported)}"
            )
        tokenizer = self.tokenizer
        before, after = self._special_affixes() if text_kwargs.get("add_special_tokens", True) else ([], [])
        ids = [before + self._encode_marked(text) + after for text in texts]
        truncation = getattr(text_kwargs.get("truncation"), "value", text_kwargs.get("truncation"))
        max_length = text_kwargs.get("max_length")
        if truncation not in (None, False, "do_not_truncate"):
            if max_length is None and tokenizer.model_max_length < int(1e20):
                max_length = tokenizer.model_max_length
            if max_length is not None:
                left = getattr(tokenizer, "truncation_side", "right") == "left"
                ids = [row[-max_length:] if left else row[:max_length] for row in ids]
        padding = text_kwargs.get("padding", False)
        return tokenizer.pad(
            {"input_ids": ids},
            padding=padding,
            max_length=max_length if getattr(padding, "value", padding) == "max_length" else None,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side"),
            return_attention_mask=text_kwargs.get("return_attention_mask"),
        )

    def _encode_marked(self, text: str) -> list:
        """Token ids of one prompt with literal marks (no special tokens added)."""
        pieces = _MARKS_RE.split(text)  # [plain, marked, plain, ..., plain]; None for a lone mark
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=False) if pieces[0] else []
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += self._literal_ids(piece) if i % 2 else self._mid_text_ids(piece)
        return ids

    def _literal_ids(self, piece: str) -> list:
        """`piece` as ordinary text tokens: `split_special_tokens` stops the special tokens from matching;
        should an added token still match (a non-special one, by some tokenizers), the piece is encoded in
        two halves, recursively, so that no added token can form."""
        ids = self._mid_text_ids(piece, split_special_tokens=True)
        added = set(self.tokenizer.added_tokens_decoder) - {self.tokenizer.unk_token_id}  # <unk>: unknown text
        if any(i in added for i in ids):
            if len(piece) > 1:
                middle = len(piece) // 2
                return self._literal_ids(piece[:middle]) + self._literal_ids(piece[middle:])
            raise ValueError(
                f"cannot keep {piece!r} literal: the tokenizer encodes the plain character as an added token"
            )
        return ids

    def _mid_text_ids(self, piece: str, **kwargs) -> list:
        """Token ids of `piece` as it reads in the middle of a prompt: encoded after a newline that is then
        dropped, so a SentencePiece tokenizer adds no word-start prefix (as transformers' own
        `sanitize_control_tokens` does); plainly when the newline does not come off cleanly."""
        encode = self.tokenizer.encode
        newline = encode("\n", add_special_tokens=False, **kwargs)
        ids = encode("\n" + piece, add_special_tokens=False, **kwargs)
        if newline and ids[: len(newline)] == newline:
            return ids[len(newline) :]
        return encode(piece, add_special_tokens=False, **kwargs)

    def _special_affixes(self):
        """The ids the tokenizer adds before and after a text when `add_special_tokens=True` (a BOS, ...)."""
        encode = self.tokenizer.encode
        plain, full = encode("a", add_special_tokens=False), encode("a", add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        raise NotImplementedError(
            "text with literal control tokens: cannot tell which special tokens the tokenizer adds"
        )

    def _images_per_sample(self, counts, images):
        """Group `images` by sample (`counts`: placeholders per prompt): a list per sample, or a flat list
        spread over the placeholders in order."""
        rule = f"the {IMAGE_PLACEHOLDER} tokens in the prompts should be the same as the number of images"
        if images is None:
            images = [[] for _ in counts]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(counts):
                raise ValueError(
                    f"images has {len(images)} per-sample lists but text has {len(counts)} samples ({rule}, "
                    "sample by sample)"
                )
            images = [flatten_images(i) for i in images]
        else:
            flat = flatten_images(images)
            if len(counts) == 1:
                images = [flat]
            elif len(flat) != sum(counts):
                raise ValueError(
                    f"{len(flat)} images given (flat list) but the {len(counts)} prompts have {sum(counts)} "
                    f"{IMAGE_PLACEHOLDER} placeholders in total ({rule}); pass one list of images per sample"
                )
            else:
                starts = np.cumsum([0, *counts])
                images = [flat[starts[i] : starts[i + 1]] for i in range(len(counts))]
        for i, (count, sample_images) in enumerate(zip(counts, images)):
            if count != len(sample_images):
                raise ValueError(
                    f"sample {i}: {len(sample_images)} images given but the prompt has {count} "
                    f"{IMAGE_PLACEHOLDER} placeholders ({rule})"
                )
        return images

    def _split_kwargs(self, kwargs):
        """Route `__call__` keyword arguments (flat, per modality, `common_kwargs`) with transformers'
        `_merge_kwargs`. Returns `(text_kwargs, images_kwargs, return_tensors, return_offsets)`."""
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"NaViLProcessor takes text and images only, got {modality}")
        # transformers (5.23+) passes its `sanitize_control_tokens` flag on to the processor: marked text is
        # always honoured here, so the flag has nothing left to do.
        kwargs.pop("sanitize_control_tokens", None)
        for nested in ("text_kwargs", "common_kwargs"):
            if isinstance(kwargs.get(nested), dict):
                kwargs[nested] = {k: v for k, v in kwargs[nested].items() if k != "sanitize_control_tokens"}
        # NaViL pads on the left unless told otherwise: a padding_side saved with the tokenizer is not
        # a NaViL default.
        init_kwargs = {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "padding_side"}
        merged = self._merge_kwargs(NaViLProcessorKwargs, tokenizer_init_kwargs=init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        # `mm_token_type_ids` are always returned (the model routes with them); these flags are processor
        # kwargs in newer transformers and text kwargs in older ones.
        text_kwargs.pop("return_mm_token_type_ids", None)
        return_offsets = bool(
            text_kwargs.pop("return_text_replacement_offsets", None) or merged.get("return_text_replacement_offsets")
        )
        return text_kwargs, images_kwargs, return_tensors, return_offsets

    def __call__(
        self,
        text: TextInput | list[TextInput] | None = None,
        images: ImageInput | None = None,
        **kwargs: Unpack[NaViLProcessorKwargs],
    ) -> BatchFeature:
        """Tokenise prompts with `<image>` placeholders and process their images.

        Args:
            text: a prompt or a list of prompts; each `<image>` (`self.image_token`) is one image of that
                sample, in order. Spans marked by `literal_text` are user text, tokenised as ordinary text
                (see `encode_conversation`, which builds such prompts from a conversation).
            images: `None`, one list of images per sample (`[[img], [img2, img3]]`), or a flat list
                (a single sample; for several samples, spread over the placeholders in order). Items:
                `PIL.Image`, file paths, HW or HWC uint8, uint16 or bool numpy arrays / torch tensors (see the image processor for the mode rules).
            **kwargs: `NaViLProcessorKwargs`, flat or nested: tokenizer arguments (`padding`,
                `padding_side` -- default `"left"` --, `truncation`, `max_length`, ...), image processor
                arguments (`min_pixels`, `max_pixels`, `multi_scale`, ...), `return_tensors` (`"pt"`,
                `"np"` or `None` for lists), `return_text_replacement_offsets`. `padding` unset pads to
                the longest prompt when there are several.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` (1 at `<IMG_CONTEXT>`
            and `<img>`: the tokens routed to the visual experts) and, with images, `pixel_values`,
            `image_grid_thw`, `num_scales`.
        """
        text_kwargs, images_kwargs, return_tensors, return_offsets = self._split_kwargs(kwargs)
        if text is None:
            if images is None:
                raise ValueError("NaViLProcessor needs text, images, or both")
            return self.image_processor(images, return_tensors=return_tensors, **images_kwargs)
        texts = _as_text_list(text)
        counts = [len(_PLACEHOLDER_RE.findall(t)) for t in texts]
        images = self._images_per_sample(counts, images)
        flat_images = [image for sample in images for image in sample]
        image_inputs = dict(self.image_processor(flat_images, **images_kwargs)) if flat_images else {}
        replacements = [self.replace_image_token(image_inputs, i) for i in range(len(flat_images))]
        data = self._tokenize_with_replacements(texts, replacements, text_kwargs, return_offsets)
        data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def from_image_layout(self, text, image_grid_thw=None, num_scales=None, **kwargs: Unpack[NaViLProcessorKwargs]):
        """Tokenise prompts for images that were already processed (e.g. the original `pixel_values`
        call form): each `<image>`, in order over the batch, takes the next `num_scales[i]` rows of
        `image_grid_thw`. Keyword arguments as in `__call__` (the text ones apply). Returns `input_ids`,
        `attention_mask`, `mm_token_type_ids` and, with images, `image_grid_thw` and `num_scales` (no
        `pixel_values`)."""
        text_kwargs, _, return_tensors, return_offsets = self._split_kwargs(kwargs)
        texts = _as_text_list(text)
        layout = {}
        if image_grid_thw is not None:
            image_grid_thw = np.asarray(_to_list(image_grid_thw), dtype=np.int64).reshape(-1, 3)
            num_scales = [len(image_grid_thw)] if num_scales is None else _to_list(num_scales)
            num_scales = np.asarray(num_scales, dtype=np.int64).reshape(-1)
            if num_scales.sum() != len(image_grid_thw):
                raise ValueError(
                    f"num_scales {num_scales.tolist()} adds up to {num_scales.sum()} but image_grid_thw has "
                    f"{len(image_grid_thw)} rows"
                )
            layout = {"image_grid_thw": image_grid_thw, "num_scales": num_scales}
        placeholders = sum(len(_PLACEHOLDER_RE.findall(t)) for t in texts)
        given = 0 if num_scales is None else len(num_scales)
        if placeholders != given:
            where = "sample 0: " if len(texts) == 1 else ""
            prompts = "the prompt has" if len(texts) == 1 else f"the {len(texts)} prompts have"
            raise ValueError(
                f"{where}{given} images given but {prompts} {placeholders} {IMAGE_PLACEHOLDER} placeholders"
            )
        replacements = [self.replace_image_token(layout, i) for i in range(given)]
        data = {**self._tokenize_with_replacements(texts, replacements, text_kwargs, return_offsets), **layout}
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        """The text `<image>` number `image_idx` (over the batch) becomes, from the processed images'
        `image_grid_thw` and `num_scales` (SPEC.md §3)."""
        num_scales = _to_list(image_inputs["num_scales"])
        start = int(sum(num_scales[:image_idx]))
        grids = _to_list(image_inputs["image_grid_thw"])[start : start + int(num_scales[image_idx])]
        return image_placeholder_expansion(grids, self.image_processor.merge_size)

    def get_text_with_replacements(self, text, images_replacements=(), videos_replacements=(), audio_replacements=()):
        """Replace the `<image>` placeholders of the prompts `text`, in order over the batch, with
        `images_replacements`. Returns the expanded prompts and, per prompt, one dict per placeholder
        (`type`, `span` and `new_span` character offsets, `text`, `replacement`) as transformers'
        `ProcessorMixin.get_text_with_replacements` does. Placeholders marked as user text
        (`literal_text`, `apply_chat_template` on text items) are left alone."""
        if videos_replacements or audio_replacements:
            raise ValueError("NaViLProcessor takes text and images only")
        replacements = iter(images_replacements)
        expanded, batch_offsets = [], []
        for sample in text:
            pieces, offsets, last, shift = [], [], 0, 0
            if images_replacements:
                for match in _PLACEHOLDER_RE.finditer(sample):
                    start, end = match.span()
                    replacement = next(replacements)
                    pieces += [sample[last:start], replacement]
                    new_start = start + shift
                    offsets.append(
                        {
                            "type": "image",
                            "span": (start, end),
                            "new_span": (new_start, new_start + len(replacement)),
                            "text": match.group(),
                            "replacement": replacement,
                        }
                    )
                    shift += len(replacement) - (end - start)
                    last = end
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            batch_offsets.append(offsets)
        return expanded, batch_offsets

    def _tokenize_with_replacements(self, texts, replacements, text_kwargs, return_offsets):
        """Expand the `<image>` placeholders with `replacements` (in order over the batch), tokenise,
        mark the visual-expert tokens, and check that no image token was cut (truncation)."""
        texts, offsets = self.get_text_with_replacements(list(texts), replacements)
        text_kwargs = dict(text_kwargs)
        if text_kwargs.get("padding") is None:
            text_kwargs["padding"] = len(texts) > 1
        inputs = self._tokenize(texts, text_kwargs)
        self._check_special_mm_tokens(texts, inputs, modalities=["image"])
        visual_ids = np.array(self.visual_expert_token_ids)
        inputs["mm_token_type_ids"] = [
            np.isin(ids, visual_ids).astype(np.int64).tolist() for ids in inputs["input_ids"]
        ]
        data = dict(inputs)
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        return data

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """Every `<IMG_CONTEXT>` of the expanded prompts `text` must be in `input_ids` (truncation can cut
        them, and the model then has more image features than slots). Counts `<IMG_CONTEXT>`, the token
        the expansion repeats, rather than transformers' default `image_token` (our `<image>`
        placeholder, which is gone after expansion)."""
        if "image" not in modalities:
            return
        in_ids = [list(ids).count(self.image_context_token_id) for ids in _to_list(text_inputs["input_ids"])]
        in_text = [len(_CONTEXT_TOKEN_RE.findall(sample)) for sample in text]
        if in_ids != in_text:
            raise ValueError(
                f"{IMAGE_CONTEXT_TOKEN} tokens per prompt: {in_text} in the expanded text but {in_ids} in "
                "input_ids; truncation cut image tokens: disable truncation or raise max_length"
            )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Per image of the given `(height, width)` sizes, without processing pixels (the helper serving
        engines such as vLLM call): `num_image_tokens`, the image's tokens as the installed transformers
        counts them (`compat_navil.IMAGE_TOKEN_COUNT_INCLUDES_MARKERS`: its `<IMG_CONTEXT>` tokens, which
        hold the embeddings, from 5.25 on; those and `<img>`, the tokens `mm_token_type_ids` marks,
        before), and `num_image_patches`, its rows of `pixel_values`. `kwargs`: image settings as in
        `__call__`. (The whole expansion, breaks and `</img>` included, is
        `image_processor.num_image_tokens(height, width)`.)"""
        data = {}
        if image_sizes is not None:
            images_kwargs = self._merge_kwargs(NaViLProcessorKwargs, **kwargs)["images_kwargs"]
            images_kwargs.pop("return_tensors", None)
            merge = self.image_processor.merge_size
            patches = [
                self.image_processor.get_number_of_image_patches(int(h), int(w), images_kwargs) for h, w in image_sizes
            ]
            markers = 1 if IMAGE_TOKEN_COUNT_INCLUDES_MARKERS else 0  # `<img>`
            data = {"num_image_tokens": [markers + n // merge**2 for n in patches], "num_image_patches": patches}
        return MultiModalData(**data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _image_items(content, index):
    """The images of a list of transformers content items (message `index`, for errors)."""
    images = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            images.append(next((item[key] for key in ("image", "path", "url") if key in item), None))
        elif kind != "text" or not isinstance(item.get("text"), str):
            raise ValueError(f"message {index}: unsupported content item {item!r} (text and image items only)")
    return images


def _as_text_list(text):
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("text must be a string or a list of strings")
    return texts


def _to_list(value):
    return value.tolist() if hasattr(value, "tolist") else list(value)


_UNSET = object()


def save_processor(processor, out_dir):
    """Save `processor` so that `AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)` (and
    `AutoImageProcessor`) load it: registers both classes for their auto classes, then
    `save_pretrained` writes `processor_config.json` (with `auto_map` for `AutoProcessor` and, nested
    under `image_processor`, for `AutoImageProcessor`), `chat_template.jinja`, the tokenizer files and
    copies `processing_navil.py`, `image_processing_navil.py` and `configuration_navil.py`.
    Returns the list of files `save_pretrained` reports. The registration lasts only for this save:
    the classes are left as they were found."""
    classes = {type(processor): "AutoProcessor", type(processor.image_processor): "AutoImageProcessor"}
    before = {cls: cls.__dict__.get("_auto_class", _UNSET) for cls in classes}
    try:
        for cls, auto_class in classes.items():
            cls.register_for_auto_class(auto_class)
        files = processor.save_pretrained(out_dir)
    finally:
        for cls, value in before.items():
            if value is _UNSET:
                del cls._auto_class  # back to the inherited None
            else:
                cls._auto_class = value
    with open(os.path.join(out_dir, "processor_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    found = {
        "auto_map.AutoProcessor": saved.get("auto_map", {}).get("AutoProcessor"),
        "image_processor.auto_map.AutoImageProcessor": saved.get("image_processor", {})
        .get("auto_map", {})
        .get("AutoImageProcessor"),
    }
    expected = {
        "auto_map.AutoProcessor": "processing_navil.NaViLProcessor",
        "image_processor.auto_map.AutoImageProcessor": "image_processing_navil.NaViLImageProcessor",
    }
    for key, value in expected.items():
        if found[key] != value:
            raise RuntimeError(f"saved processor_config.json has {key} = {found[key]!r}, expected {value!r}")
    return files


__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_SYSTEM_MESSAGE",
    "LITERAL_END",
    "IMAGE_PLACEHOLDER",
    "IMAGE_PREFIX",
    "LITERAL_START",
    "NaViLProcessor",
    "NaViLProcessorKwargs",
    "extend_chat_template",
    "image_placeholder_expansion",
    "image_placement",
    "save_processor",
    "strip_literal_marks",
]
