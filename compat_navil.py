"""The one place where NaViL's remote code touches transformers internals that move between releases.

Every converted folder carries this file next to the model code, frozen at the version it was pushed
with, so the rest of the code reads the same on every supported transformers and only this file
knows what differs:

* the floor: transformers older than `MIN_TRANSFORMERS` is refused with one line naming it;
* the cache's name: `past_key_values` up to 5.23, `cache` from 5.24 on (forward and generation
  kwargs, mask helpers, model-output fields);
* the causal-mask helper's signature;
* RoPE inverse frequencies for every rope type transformers knows, with the sequence length the
  dynamic types (dynamic NTK, longrope) need;
* the marker `apply_chat_template(..., sanitize_control_tokens=True)` puts before user text (5.23+);
* how `ProcessorMixin.from_pretrained` asks a processor class for its sub-processors (5.25 rewrote it);
* what a processor's `_get_num_multimodal_tokens` counts as an image's tokens (5.25 changed it).

Supported and tested: transformers 5.16.1 (the oldest that vLLM 0.32 accepts) to 5.25.0.
"""

from __future__ import annotations

import inspect
import re
import warnings

import transformers
from transformers import GenerationMixin
from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.processing_utils import ProcessorMixin

MIN_TRANSFORMERS = "5.16.1"
TESTED_TRANSFORMERS = ("5.16.1", "5.25.0")  # oldest and newest release the test suite runs on


def _release(version: str) -> tuple[int, ...]:
    """(5, 24, 0) for "5.24.0", "5.24.0.dev0" or "5.24.0rc1"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


class UnsupportedTransformersError(RuntimeError):
    """transformers is older than NaViL's floor (not an ImportError: the sibling-import fallbacks must
    not swallow it)."""


TRANSFORMERS_VERSION = transformers.__version__
if _release(TRANSFORMERS_VERSION) < _release(MIN_TRANSFORMERS):
    raise UnsupportedTransformersError(
        f"NaViL needs transformers>={MIN_TRANSFORMERS}, found {TRANSFORMERS_VERSION}: "
        f"pip install -U 'transformers>={MIN_TRANSFORMERS}'"
    )


if _release(TRANSFORMERS_VERSION) > _release(TESTED_TRANSFORMERS[1]):
    from transformers.utils import logging

    logging.get_logger(__name__).warning_once(
        f"NaViL's remote code was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; "
        f"this is {TRANSFORMERS_VERSION}. If something breaks, pip install 'transformers<={TESTED_TRANSFORMERS[1]}'"
    )


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


# The cache's keyword in model forwards and in `generate`'s model kwargs: `cache` from 5.24 on.
CACHE_KWARG = "cache" if _accepts(GenerationMixin.prepare_inputs_for_generation, "cache") else "past_key_values"
# The cache's field in model outputs (`BaseModelOutputWithPast.cache` from 5.24 on).
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_KWARG = "cache" if _accepts(_create_causal_mask, "cache") else "past_key_values"


def pop_cache(kwargs: dict, cache=None, past_key_values=None):
    """The cache, given under any of its names (the explicit arguments, then `kwargs`, which loses it).
    Two different caches are an error. Where transformers calls it `cache` (5.24+), the old name warns
    as transformers' own models do."""
    past_key_values = past_key_values if past_key_values is not None else kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else kwargs.pop("cache", None)
    if past_key_values is not None and CACHE_KWARG == "cache":
        warnings.warn(
            "`past_key_values` is deprecated and will be removed in version 5.40.0 for NaViL. Use `cache` instead.",
            FutureWarning,
            stacklevel=3,
        )
    found = [c for c in (cache, past_key_values) if c is not None]
    if any(c is not found[0] for c in found[1:]):
        raise ValueError("pass the cache once, as `cache` or `past_key_values`, not both")
    return found[0] if found else None


def output_cache(outputs):
    """The cache a model output carries, on any supported version (no deprecation warning)."""
    return outputs.get(CACHE_FIELD) if hasattr(outputs, "get") else None


def cache_field(cache) -> dict:
    """Keyword arguments that put `cache` into a model output."""
    return {CACHE_FIELD: cache}


def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """transformers' causal mask for `config._attn_implementation` (None where the backend needs none).

    `generate` with a compileable (static) cache prepares the masks itself, as a dict by layer type
    (every NaViL text layer is `full_attention`); those are used as they are."""
    if isinstance(attention_mask, dict):
        return attention_mask["full_attention"]
    return _create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_MASK_CACHE_KWARG: cache},
    )


# The marks around user text that must stay literal: transformers >= 5.23's own (its
# `apply_chat_template(..., sanitize_control_tokens=True)`), the same private-use characters before.
try:
    from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END as CONTROL_TOKEN_END
    from transformers.utils.chat_template_utils import _CONTROL_TOKEN_START as CONTROL_TOKEN_START
except ImportError:
    CONTROL_TOKEN_START, CONTROL_TOKEN_END = "\U000f0000", "\U000f0001"


# How `ProcessorMixin.from_pretrained` builds a processor's sub-processors (tokenizer, image processor): up to
# 5.24 it asks the class's `_get_arguments_from_pretrained` for them as a list in `__init__` order; from 5.25
# it asks `_resolve_subprocessors` for the processor dict with them filled in and the kwargs left for
# `__init__`. Either way transformers would load the image processor through `AutoImageProcessor`.
_SUBPROCESSORS_IN_DICT = hasattr(ProcessorMixin, "_resolve_subprocessors")


def install_subprocessor_loader(processor_class):
    """Class decorator: `processor_class.from_pretrained` builds its sub-processors with the class's
    `_load_subprocessors(path, **kwargs)`, which returns them as {attribute: object}. `kwargs` are
    `from_pretrained`'s: hub arguments, settings such as `max_pixels`, sub-processors the caller passed.
    From 5.25, of those only the processor's own `__init__` arguments go on to `from_dict`."""
    if _SUBPROCESSORS_IN_DICT:

        def resolve(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
            loaded = cls._load_subprocessors(pretrained_model_name_or_path, **kwargs)
            init = inspect.signature(cls.__init__).parameters
            rest = {key: value for key, value in kwargs.items() if key in init and key not in loaded}
            return {**processor_dict, **loaded}, rest

        processor_class._resolve_subprocessors = classmethod(resolve)
    else:

        def arguments(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
            loaded = cls._load_subprocessors(pretrained_model_name_or_path, **kwargs)
            return [loaded[attribute] for attribute in cls.get_attributes()]

        processor_class._get_arguments_from_pretrained = classmethod(arguments)
    return processor_class


# What `num_image_tokens` of a processor's `_get_num_multimodal_tokens` (the count serving engines such as
# vLLM read) counts: up to 5.24 every token `mm_token_type_ids` marks as image (with NaViL: `<img>` and each
# `<IMG_CONTEXT>`); from 5.25 the tokens that hold an image embedding (each `<IMG_CONTEXT>`; transformers'
# own InternVL processor dropped its `<img>`/`</img>` from the count in that release).
IMAGE_TOKEN_COUNT_INCLUDES_MARKERS = _release(TRANSFORMERS_VERSION) < (5, 25)


# Rope types whose frequencies depend on the sequence length.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def rope_inv_freq(config, device, seq_len: int | None = None):
    """(inverse frequencies [head_dim / 2] in float32, attention scaling) of `config.rope_parameters`.

    `seq_len` (the longest position + 1 of this forward) drives the dynamic rope types: dynamic NTK
    stretches the base beyond `max_position_embeddings`, longrope switches to its long factors beyond
    `original_max_position_embeddings`; the static types ignore it."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS since 5.0
        import torch

        dim, base = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
        raise ValueError(f"unknown rope_type {rope_type!r} in rope_parameters; transformers knows {known}")
    kwargs = {"seq_len": seq_len} if rope_type in DYNAMIC_ROPE_TYPES and seq_len is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, **kwargs)
    return inv_freq.float(), scaling


__all__ = [
    "CACHE_FIELD",
    "CONTROL_TOKEN_END",
    "CONTROL_TOKEN_START",
    "CACHE_KWARG",
    "MIN_TRANSFORMERS",
    "cache_field",
    "create_causal_mask",
    "output_cache",
    "pop_cache",
    "rope_inv_freq",
]
