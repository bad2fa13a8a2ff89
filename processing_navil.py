"""Processor for NaViL: chat templates, `<image>` expansion into the visual token layout, tokenisation.

* `CHAT_TEMPLATES` -- Jinja versions of the original `qwen3-chat` and `internlm2-chat` conversation
  templates (ChatML without a newline after `<|im_end|>`, the original default system message, Qwen3's
  empty `<think>` block at the start of every assistant turn). `{"type": "image"}` content items render
  as `<image>\\n` ahead of the text, as the original prepends them.
* `NaViLProcessor` -- expands every `<image>` placeholder into `<img>`, per scale (smallest first)
  `grid_h/2` rows of `<IMG_CONTEXT>` x `grid_w/2` + `<IMG_LINE_BREAK>`, then `<IMG_FRAME_BREAK>`, and
  finally `</img>` (SPEC.md §3); tokenises; marks the visual-expert tokens (`<IMG_CONTEXT>`, `<img>`)
  in `mm_token_type_ids`.
* `save_processor` -- writes a folder that `AutoProcessor.from_pretrained(dir, trust_remote_code=True)`
  loads (auto_map entries, code files, tokenizer, chat template).
"""

import json
import os

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

try:
    from .configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
        SPECIAL_TOKENS,
        VISUAL_EXPERT_TOKENS,
    )
    from .image_processing_navil import NaViLImageProcessor, flatten_images
except ImportError:  # imported as a top-level module (tests, scripts next to the file)
    from configuration_navil import (
        IMAGE_CONTEXT_TOKEN,
        IMAGE_END_TOKEN,
        IMAGE_FRAME_BREAK_TOKEN,
        IMAGE_LINE_BREAK_TOKEN,
        IMAGE_START_TOKEN,
        SPECIAL_TOKENS,
        VISUAL_EXPERT_TOKENS,
    )
    from image_processing_navil import NaViLImageProcessor, flatten_images

IMAGE_PLACEHOLDER = "<image>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
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
    """The text one `<image>` becomes, given the image's `image_grid_thw` rows (smallest scale first)."""
    parts = [IMAGE_START_TOKEN]
    for _, grid_h, grid_w in grids:
        row = IMAGE_CONTEXT_TOKEN * (int(grid_w) // merge_size) + IMAGE_LINE_BREAK_TOKEN
        parts.append(row * (int(grid_h) // merge_size) + IMAGE_FRAME_BREAK_TOKEN)
    parts.append(IMAGE_END_TOKEN)
    return "".join(parts)


class NaViLProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + chat template for NaViL.

    Args:
        image_processor: a `NaViLImageProcessor` (default settings when `None`).
        tokenizer: the checkpoint's tokenizer; it must carry the 12 special tokens and `<|im_start|>`,
            `<|im_end|>` as single tokens.
        chat_template: a Jinja template, or a name in `CHAT_TEMPLATES` (`"qwen3-chat"`, `"internlm2-chat"`).
    """

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
        self.image_token = IMAGE_CONTEXT_TOKEN
        self.image_token_id = vocab[IMAGE_CONTEXT_TOKEN]
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

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", *self.image_processor.model_input_names]

    def _images_per_sample(self, texts, images):
        """Group `images` by sample: a list per sample, or a flat list spread over the placeholders in order."""
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        if images is None:
            images = [[] for _ in texts]
        elif isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"images has {len(images)} per-sample lists but text has {len(texts)} samples")
            images = [flatten_images(i) for i in images]
        else:
            flat = flatten_images(images)
            if len(texts) == 1:
                images = [flat]
            elif len(flat) != sum(counts):
                raise ValueError(
                    f"{len(flat)} images given (flat list) but the {len(texts)} prompts have {sum(counts)} "
                    f"{IMAGE_PLACEHOLDER} placeholders in total; pass one list of images per sample"
                )
            else:
                starts = np.cumsum([0, *counts])
                images = [flat[starts[i] : starts[i + 1]] for i in range(len(texts))]
        for i, (count, sample_images) in enumerate(zip(counts, images)):
            if count != len(sample_images):
                raise ValueError(
                    f"sample {i}: {len(sample_images)} images given but the prompt has {count} "
                    f"{IMAGE_PLACEHOLDER} placeholders"
                )
        return images

    def __call__(self, text=None, images=None, return_tensors=None, padding=None, padding_side="left", **kwargs):
        """Tokenise prompts with `<image>` placeholders and process their images.

        Args:
            text: a prompt or a list of prompts; each `<image>` is one image of that sample, in order.
            images: `None`, one list of images per sample (`[[img], [img2, img3]]`), or a flat list
                (a single sample; for several samples, spread over the placeholders in order). Items:
                `PIL.Image`, file paths, HWC uint8 numpy arrays / torch tensors.
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            padding: tokenizer padding; `None` (default) pads to the longest prompt when there are several.
            padding_side: `"left"` (default, what generation wants) or `"right"`.
            **kwargs: passed to the tokenizer (`truncation`, `max_length`, ...).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` (1 at `<IMG_CONTEXT>`
            and `<img>`: the tokens routed to the visual experts) and, with images, `pixel_values`,
            `image_grid_thw`, `num_scales`.
        """
        if text is None:
            if images is None:
                raise ValueError("NaViLProcessor needs text, images, or both")
            return self.image_processor(images, return_tensors=return_tensors)
        texts = _as_text_list(text)
        images = self._images_per_sample(texts, images)
        flat_images = [image for sample in images for image in sample]
        image_inputs = self.image_processor(flat_images) if flat_images else {}
        grids, num_scales = image_inputs.get("image_grid_thw"), image_inputs.get("num_scales")
        data = self._tokenize_with_layout(texts, grids, num_scales, padding, padding_side, **kwargs)
        data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def from_image_layout(
        self,
        text,
        image_grid_thw=None,
        num_scales=None,
        return_tensors=None,
        padding=None,
        padding_side="left",
        **kwargs,
    ):
        """Tokenise prompts for images that were already processed (e.g. the original `pixel_values`
        call form): each `<image>`, in order over the batch, takes the next `num_scales[i]` rows of
        `image_grid_thw`. Returns `input_ids`, `attention_mask`, `mm_token_type_ids` and, with images,
        `image_grid_thw` and `num_scales` (no `pixel_values`)."""
        texts = _as_text_list(text)
        data = {}
        if image_grid_thw is not None:
            image_grid_thw = np.asarray(_to_list(image_grid_thw), dtype=np.int64).reshape(-1, 3)
            num_scales = [len(image_grid_thw)] if num_scales is None else _to_list(num_scales)
            num_scales = np.asarray(num_scales, dtype=np.int64).reshape(-1)
            if num_scales.sum() != len(image_grid_thw):
                raise ValueError(
                    f"num_scales {num_scales.tolist()} adds up to {num_scales.sum()} but image_grid_thw has "
                    f"{len(image_grid_thw)} rows"
                )
            data = {"image_grid_thw": image_grid_thw, "num_scales": num_scales}
        placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        given = 0 if num_scales is None else len(num_scales)
        if placeholders != given:
            where = "sample 0: " if len(texts) == 1 else ""
            prompts = "the prompt has" if len(texts) == 1 else f"the {len(texts)} prompts have"
            raise ValueError(f"{where}{given} images given but {prompts} {placeholders} {IMAGE_PLACEHOLDER} placeholders")
        text_inputs = self._tokenize_with_layout(texts, image_grid_thw, num_scales, padding, padding_side, **kwargs)
        data = {**text_inputs, **data}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenize_with_layout(self, texts, image_grid_thw, num_scales, padding, padding_side, **kwargs):
        """Expand the `<image>` placeholders (in order over the batch) with the given layout, tokenise,
        and mark the visual-expert tokens."""
        if num_scales is not None and len(num_scales):
            grids = _to_list(image_grid_thw)
            starts = np.cumsum([0, *_to_list(num_scales)])
            merge = self.image_processor.merge_size
            blocks = iter(
                image_placeholder_expansion(grids[starts[i] : starts[i + 1]], merge) for i in range(len(starts) - 1)
            )
            texts = ["".join(_interleave(t.split(IMAGE_PLACEHOLDER), blocks)) for t in texts]
        if padding is None:
            padding = len(texts) > 1
        inputs = self.tokenizer(texts, padding=padding, padding_side=padding_side, **kwargs)
        visual_ids = np.array(self.visual_expert_token_ids)
        inputs["mm_token_type_ids"] = [
            np.isin(ids, visual_ids).astype(np.int64).tolist() for ids in inputs["input_ids"]
        ]
        return dict(inputs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _as_text_list(text):
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("text must be a string or a list of strings")
    return texts


def _to_list(value):
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _interleave(pieces, blocks):
    yield pieces[0]
    for piece in pieces[1:]:
        yield next(blocks)
        yield piece


def save_processor(processor, out_dir):
    """Save `processor` so that `AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)` (and
    `AutoImageProcessor`) load it: registers both classes for their auto classes, then
    `save_pretrained` writes `processor_config.json` (with `auto_map` for `AutoProcessor` and, nested
    under `image_processor`, for `AutoImageProcessor`), `chat_template.jinja`, the tokenizer files and
    copies `processing_navil.py`, `image_processing_navil.py` and `configuration_navil.py`.
    Returns the list of files `save_pretrained` reports."""
    type(processor).register_for_auto_class("AutoProcessor")
    type(processor.image_processor).register_for_auto_class("AutoImageProcessor")
    files = processor.save_pretrained(out_dir)
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
    "NaViLProcessor",
    "extend_chat_template",
    "image_placeholder_expansion",
    "save_processor",
]
