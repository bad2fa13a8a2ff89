"""What an original NaViL `config.json` may hold, checked before any tensor is read.

A checkpoint comes from a stranger: a wrong type or value must not become a silently different model
(a string `"2"` for `fullatt_block_indexes` drops the full-attention layer) or a traceback deep in the
conversion (`downsample_ratio: 0`). Each field has a rule; keys without one are carried as they are.
Errors name the file, the field and what was expected, on one line.
"""

import math

from ..errors import ConversionError


class ConfigSchemaError(ConversionError):
    """A config.json field has a wrong type or value."""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = ("a positive integer", lambda v: _is_int(v) and v > 0)
TOKEN_ID = ("a token id (an integer >= 0) or null", lambda v: v is None or (_is_int(v) and v >= 0))
TOKEN_IDS = (
    "a token id, a list of token ids, or null",
    lambda v: TOKEN_ID[1](v) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
)
BOOL = ("true or false", lambda v: isinstance(v, bool))
POSITIVE_NUMBER = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
RATIO = ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1)
TEXT = ("a string", lambda v: isinstance(v, str))
MAPPING_OR_NULL = ("an object or null", lambda v: v is None or isinstance(v, dict))


def _optional(rule):
    return (f"{rule[0]} or null", lambda v: v is None or rule[1](v))


def _one_of(*values):
    return (" or ".join(repr(v) for v in values), lambda v: v in values)


def _activation():
    from transformers.activations import ACT2FN

    names = sorted(ACT2FN)
    return (f"an activation transformers knows ({', '.join(names)})", lambda v: isinstance(v, str) and v in ACT2FN)


def _layer_indexes():
    return (
        "a list of layer indexes (integers >= 0)",
        lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
    )


def vision_schema():
    return {
        "hidden_size": POSITIVE_INT,
        "intermediate_size": POSITIVE_INT,
        "num_hidden_layers": POSITIVE_INT,
        "num_attention_heads": POSITIVE_INT,
        "num_channels": _one_of(3),
        "patch_size": POSITIVE_INT,
        "qkv_bias": BOOL,
        "qk_normalization": BOOL,
        "norm_type": _one_of("rms_norm", "layer_norm"),
        "layer_norm_eps": POSITIVE_NUMBER,
        "hidden_act": _activation(),
        "fullatt_block_indexes": _layer_indexes(),
        "window_size": POSITIVE_INT,
        "initializer_range": NON_NEGATIVE_NUMBER,
        "initializer_factor": NON_NEGATIVE_NUMBER,
    }


def llm_schema():
    return {
        "vocab_size": POSITIVE_INT,
        "hidden_size": POSITIVE_INT,
        "intermediate_size": POSITIVE_INT,
        "num_hidden_layers": POSITIVE_INT,
        "num_attention_heads": POSITIVE_INT,
        "num_key_value_heads": _optional(POSITIVE_INT),
        "head_dim": _optional(POSITIVE_INT),
        "hidden_act": _activation(),
        "max_position_embeddings": POSITIVE_INT,
        "rms_norm_eps": POSITIVE_NUMBER,
        "rope_theta": POSITIVE_NUMBER,
        "rope_scaling": MAPPING_OR_NULL,
        "tie_word_embeddings": BOOL,
        "attention_bias": BOOL,
        "bias": BOOL,
        "initializer_range": NON_NEGATIVE_NUMBER,
        "bos_token_id": TOKEN_ID,
        "pad_token_id": TOKEN_ID,
        "eos_token_id": TOKEN_IDS,
    }


TOP_SCHEMA = {
    "downsample_ratio": RATIO,
    "scale_downsample_ratio": RATIO,
    "min_dynamic_patch": POSITIVE_INT,
    "max_dynamic_patch": POSITIVE_INT,
    "template": _optional(TEXT),
    "special_token_table": _one_of("prompt", "everywhere"),
}


def _check_fields(section, schema, where, path):
    for name, (expected, ok) in schema.items():
        if name in section and not ok(section[name]):
            raise ConfigSchemaError(f"{path}: {where}{name} must be {expected}, got {section[name]!r}")


def validate_original_config(config, path="config.json"):
    """Raise `ConfigSchemaError` on the first field of an original config dict with a wrong type or value,
    or on settings that contradict each other."""
    if not isinstance(config, dict):
        raise ConfigSchemaError(f"{path} must hold a JSON object, got {type(config).__name__}")
    for section in ("vision_config", "llm_config"):
        if not isinstance(config.get(section), dict):
            raise ConfigSchemaError(f"{path} has no {section} object")
    vision, llm = config["vision_config"], config["llm_config"]
    _check_fields(config, TOP_SCHEMA, "", path)
    _check_fields(vision, vision_schema(), "vision_config.", path)
    _check_fields(llm, llm_schema(), "llm_config.", path)

    ratio = config.get("downsample_ratio", vision.get("downsample_ratio", 0.5))
    if not RATIO[1](ratio) or abs(1 / ratio - round(1 / ratio)) > 1e-6:
        raise ConfigSchemaError(f"{path}: downsample_ratio must be 1/k for a whole k (0.5: a 2x2 merge), got {ratio!r}")
    layers = vision.get("num_hidden_layers")
    indexes = vision.get("fullatt_block_indexes") or []
    bad = [i for i in indexes if _is_int(layers) and i >= layers]
    if bad or len(set(indexes)) != len(indexes):
        raise ConfigSchemaError(
            f"{path}: vision_config.fullatt_block_indexes must be distinct layer indexes below num_hidden_layers "
            f"({layers}), got {indexes!r}"
        )
    for where, section in (("vision_config", vision), ("llm_config", llm)):
        width, heads = section.get("hidden_size"), section.get("num_attention_heads")
        if where == "vision_config" or section.get("head_dim") is None:
            if _is_int(width) and _is_int(heads) and width % heads:
                raise ConfigSchemaError(
                    f"{path}: {where}.hidden_size ({width}) must be a multiple of num_attention_heads ({heads})"
                )
    heads, kv_heads = llm.get("num_attention_heads"), llm.get("num_key_value_heads")
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise ConfigSchemaError(
            f"{path}: llm_config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    low, high = config.get("min_dynamic_patch"), config.get("max_dynamic_patch")
    if _is_int(low) and _is_int(high) and low > high:
        raise ConfigSchemaError(f"{path}: min_dynamic_patch ({low}) is larger than max_dynamic_patch ({high})")
    vocab = llm.get("vocab_size")
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        ids = llm.get(name)
        ids = ids if isinstance(ids, list) else [ids]
        over = [i for i in ids if i is not None and _is_int(vocab) and i >= vocab]
        if over:
            raise ConfigSchemaError(f"{path}: llm_config.{name} {over[0]} is not below vocab_size ({vocab})")


def check_token_ids(token_ids, vocab_size, path="config.json"):
    """The tokenizer's ids of NaViL's tokens (`{token: id}`) must index the embedding (`vocab_size` rows)."""
    over = {token: i for token, i in token_ids.items() if i >= vocab_size}
    if over:
        token, i = next(iter(over.items()))
        raise ConfigSchemaError(
            f"the tokenizer gives {token} the id {i}, but {path} llm_config.vocab_size is {vocab_size}: "
            f"{len(over)} of NaViL's tokens have no embedding row"
        )
