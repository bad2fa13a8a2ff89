"""Key maps between the original OpenGVLab NaViL checkpoint layout (SPEC §7) and ours, as data; also the
maps `navil init-from-llm` uses from a plain LLM (`internlm2_decoder_keys` rooted there, `llm_decoder_keys`).

A row is `(original, ours)` or `(original, ours, op)`:

* `original` / `ours` are key templates (one string or a tuple of strings). `{name}` placeholders match
  the patterns in `PLACEHOLDERS` and carry over from one side to the other, so one table serves both
  directions. The first original template is the one a key is matched against; further ones are extra
  inputs of the op.
* `ours = None` means "drop" (derived buffers some checkpoints carry).
* `op` names the tensor surgery (`surgery.py`) or `COPY` (one tensor to every target); no op is a plain
  rename.

InternLM2's visual output projection `wo_ve(wo(x))` has two variants of its rows: kept chained (a rename; our
`text_config.chain_visual_output=True`, the default) or folded into one `o_proj_ve` (`--fold-visual-output`).
Functions that take a `text_config` pick the variant it describes (`rules_for_config`).
"""

import functools
import re
from dataclasses import dataclass

from ..errors import ConversionError
from .surgery import (
    fold_chained_bias,
    fold_chained_projection,
    merge_internlm2_wqkv,
    split_internlm2_wqkv,
    unfold_chained_projection,
)

PLACEHOLDERS = {
    "n": r"\d+",  # layer index
    "wb": r"weight|bias",
    "ve": r"(?:_ve)?",  # visual-expert copy of a projection
    "norm": r"norm1|norm2",
    "ls": r"ls1|ls2",
    "fc": r"fc1|fc2",
    "qk": r"q|k",
    "qkvo": r"q|k|v|o",
    "gate_up_down": r"gate|up|down",
    "path": r".*",  # any leading module path (for buffers a checkpoint may carry anywhere)
}

RENAME = "rename"
SPLIT_WQKV = "split_wqkv"  # wqkv -> (q, k, v)
FOLD = "fold"  # (wo_ve.weight, wo.weight) -> o_proj_ve.weight = W_ve @ W
FOLD_BIAS = "fold_bias"  # (wo_ve.bias, wo_ve.weight, wo.bias) -> o_proj_ve.bias = W_ve @ b + b_ve
COPY = "copy"  # one tensor -> every target (a visual expert starting as its text twin)

_V = "vision_model.encoder.layers.{n}"
_OV = "model.vision_model.layers.{n}"
_L = "language_model.model.layers.{n}"
_OL = "model.language_model.layers.{n}"

# fmt: off
VISION_AND_CONNECTOR_KEYS = (
    # original                                      ours
    ("vision_model.embeddings.patch_embedding.{wb}", "model.vision_model.patch_embed.{wb}"),
    (f"{_V}.{{norm}}.{{wb}}",                        f"{_OV}.{{norm}}.{{wb}}"),
    (f"{_V}.attn.qkv.{{wb}}",                        f"{_OV}.attn.qkv.{{wb}}"),
    (f"{_V}.attn.{{qk}}_norm.weight",                f"{_OV}.attn.{{qk}}_norm.weight"),
    (f"{_V}.attn.proj.{{wb}}",                       f"{_OV}.attn.proj.{{wb}}"),
    (f"{_V}.mlp.{{fc}}.{{wb}}",                      f"{_OV}.mlp.{{fc}}.{{wb}}"),
    (f"{_V}.{{ls}}",                                 f"{_OV}.{{ls}}"),
    ("mlp1.0.{wb}",                                  "model.connector.norm.{wb}"),
    ("mlp1.1.{wb}",                                  "model.connector.linear_1.{wb}"),
    ("mlp1.3.{wb}",                                  "model.connector.linear_2.{wb}"),
    ("special_token_embedding.weight",               "model.special_token_embedding.weight"),  # never folded (SPEC §8.3)
)

QWEN3_KEYS = (
    ("language_model.model.embed_tokens.weight",                "model.language_model.embed_tokens.weight"),
    (f"{_L}.input_layernorm.weight",                            f"{_OL}.input_layernorm.weight"),
    (f"{_L}.post_attention_layernorm.weight",                   f"{_OL}.post_attention_layernorm.weight"),
    (f"{_L}.self_attn.{{qkvo}}_proj{{ve}}.{{wb}}",              f"{_OL}.self_attn.{{qkvo}}_proj{{ve}}.{{wb}}"),
    (f"{_L}.self_attn.{{qk}}_norm{{ve}}.weight",                f"{_OL}.self_attn.{{qk}}_norm{{ve}}.weight"),
    (f"{_L}.mlp{{ve}}.{{gate_up_down}}_proj.weight",            f"{_OL}.mlp{{ve}}.{{gate_up_down}}_proj.weight"),
    ("language_model.model.norm.weight",                        "model.language_model.norm.weight"),
    ("language_model.lm_head.weight",                           "lm_head.weight"),
    ("language_model.model.rotary_emb.inv_freq",                None),
    (f"{_L}.self_attn.rotary_emb.inv_freq",                     None),
)

# fmt: on


def internlm2_decoder_keys(source_root="language_model.", target_model="model.language_model", experts=True):
    """InternLM2's decoder names -> ours: the one InternLM2 table. `source_root` prefixes the InternLM2
    names (`language_model.` inside a NaViL checkpoint, empty for a plain InternLM2 LLM); `target_model`
    is where our decoder lives (`model` for a plain Llama-named decoder); `experts` keeps the `_ve`
    visual-expert copies (a plain LLM has none)."""
    src, dst = f"{source_root}model", target_model
    ve = "{ve}" if experts else ""  # the placeholder, or nothing
    rows = (
        (f"{src}.tok_embeddings.weight",                             f"{dst}.embed_tokens.weight"),
        (f"{src}.layers.{{n}}.attention_norm.weight",                f"{dst}.layers.{{n}}.input_layernorm.weight"),
        (f"{src}.layers.{{n}}.ffn_norm.weight",                      f"{dst}.layers.{{n}}.post_attention_layernorm.weight"),
        (f"{src}.layers.{{n}}.attention.wqkv{ve}.{{wb}}",          tuple(f"{dst}.layers.{{n}}.self_attn.{p}_proj{ve}.{{wb}}"
                                                                           for p in "qkv"),                      SPLIT_WQKV),
        (f"{src}.layers.{{n}}.attention.wo.{{wb}}",                  f"{dst}.layers.{{n}}.self_attn.o_proj.{{wb}}"),
        (f"{src}.layers.{{n}}.feed_forward{ve}.w1.weight",         f"{dst}.layers.{{n}}.mlp{ve}.gate_proj.weight"),
        (f"{src}.layers.{{n}}.feed_forward{ve}.w3.weight",         f"{dst}.layers.{{n}}.mlp{ve}.up_proj.weight"),
        (f"{src}.layers.{{n}}.feed_forward{ve}.w2.weight",         f"{dst}.layers.{{n}}.mlp{ve}.down_proj.weight"),
        (f"{src}.norm.weight",                                       f"{dst}.norm.weight"),
        (f"{source_root}output.weight",                              "lm_head.weight"),
        (f"{src}.rotary_emb.inv_freq",                               None),
        (f"{src}.layers.{{n}}.attention.rotary_emb.inv_freq",        None),
    )  # fmt: skip
    return rows


INTERNLM2_KEYS = internlm2_decoder_keys()

# fmt: off
# InternLM2's visual output projection `wo_ve(wo(x))` (SPEC §8.2), two ways:
INTERNLM2_CHAINED_VISUAL_OUTPUT = (  # kept chained (chain_visual_output=True): exact both ways
    (f"{_L}.attention.wo_ve.{{wb}}",                            f"{_OL}.self_attn.o_proj_ve.{{wb}}"),
)
INTERNLM2_FOLDED_VISUAL_OUTPUT = (  # folded into one o_proj_ve = W_ve @ W (opt-in): no exact inverse
    ((f"{_L}.attention.wo_ve.weight", f"{_L}.attention.wo.weight"),
                                                                f"{_OL}.self_attn.o_proj_ve.weight",          FOLD),
    ((f"{_L}.attention.wo_ve.bias", f"{_L}.attention.wo_ve.weight", f"{_L}.attention.wo.bias"),
                                                                f"{_OL}.self_attn.o_proj_ve.bias",            FOLD_BIAS),
)
# fmt: on


def llm_decoder_keys(visual_experts=True):
    """A Hugging Face Llama-named decoder (Llama, Qwen2, Qwen3, InternLM2 after `internlm2_decoder_keys`) ->
    our text model's decoder layers and final norm (`navil init-from-llm`). With `visual_experts` every
    expert starts as a copy of its text twin: `{q,k,v,o}_proj` -> `..._proj_ve`, `{q,k}_norm` -> `..._norm_ve`,
    `mlp` -> `mlp_ve`. The embedding and LM head are resized by init-from-llm itself, so dropped here."""
    src, dst = "model.layers.{n}", _OL

    def twins(part, expert_part):
        if not visual_experts:
            return (f"{src}.{part}", f"{dst}.{part}")
        return (f"{src}.{part}", (f"{dst}.{part}", f"{dst}.{expert_part}"), COPY)

    rows = (
        twins("self_attn.{qkvo}_proj.{wb}",      "self_attn.{qkvo}_proj_ve.{wb}"),
        twins("self_attn.{qk}_norm.{wb}",        "self_attn.{qk}_norm_ve.{wb}"),
        twins("mlp.{gate_up_down}_proj.{wb}",    "mlp_ve.{gate_up_down}_proj.{wb}"),
        (f"{src}.input_layernorm.weight",           f"{dst}.input_layernorm.weight"),
        (f"{src}.post_attention_layernorm.weight",  f"{dst}.post_attention_layernorm.weight"),
        ("model.norm.weight",                       "model.language_model.norm.weight"),
        ("model.embed_tokens.weight",               None),
        ("lm_head.weight",                          None),
        ("{path}rotary_emb.inv_freq",               None),
    )  # fmt: skip
    return rows


QWEN3 = "Qwen3VEForCausalLM"
INTERNLM2 = "InternLM2VEForCausalLM"
LLM_KEYS = {QWEN3: QWEN3_KEYS, INTERNLM2: INTERNLM2_KEYS + INTERNLM2_CHAINED_VISUAL_OUTPUT}
FOLDED_LLM_KEYS = {INTERNLM2: INTERNLM2_KEYS + INTERNLM2_FOLDED_VISUAL_OUTPUT}  # fold_visual_output=True
EXACT_OPS = (RENAME, SPLIT_WQKV, COPY)  # ops whose inverse reproduces the original bit for bit


@functools.cache
def _template_regex(template):
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})")
    return re.compile("".join(out))


@dataclass(frozen=True)
class Rule:
    """One row of a key table, compiled."""

    sources: tuple  # original templates; sources[0] is matched, the rest are extra inputs of `op`
    targets: tuple  # our templates; empty means the source is dropped
    op: str = RENAME

    @property
    def source_pattern(self):
        return _template_regex(self.sources[0])

    @property
    def target_patterns(self):
        return tuple(_template_regex(t) for t in self.targets)

    @property
    def exact(self):
        return self.op in EXACT_OPS


def compile_table(table):
    rules = []
    for row in table:
        sources, targets, op = (*row, RENAME)[:3] if len(row) == 2 else row
        sources = (sources,) if isinstance(sources, str) else tuple(sources)
        targets = () if targets is None else ((targets,) if isinstance(targets, str) else tuple(targets))
        rules.append(Rule(sources, targets, op))
    return tuple(rules)


@functools.cache
def rules_for(llm_architecture, fold_visual_output=False):
    """Compiled rules for a whole NaViL checkpoint whose language model is `llm_architecture`;
    `fold_visual_output` picks the folded InternLM2 variant (no effect on Qwen3, which has no chain)."""
    if llm_architecture not in LLM_KEYS:
        raise ValueError(
            f"unsupported language model architecture {llm_architecture!r}; supported: {', '.join(LLM_KEYS)}"
        )
    table = FOLDED_LLM_KEYS.get(llm_architecture) if fold_visual_output else None
    return compile_table(VISION_AND_CONNECTOR_KEYS + (table or LLM_KEYS[llm_architecture]))


def folds_visual_output(llm_architecture, text_config):
    """Whether our layout described by `text_config` holds InternLM2's visual output chain folded."""
    chained = bool(getattr(text_config, "chain_visual_output", False))
    if llm_architecture != INTERNLM2 and chained:
        raise KeyMismatchError(
            f"chain_visual_output=True is InternLM2's layout; {llm_architecture} has no chained visual output "
            "projection"
        )
    return llm_architecture == INTERNLM2 and not chained


def rules_for_config(llm_architecture, text_config):
    """The rules for the layout `text_config` describes (chained or folded InternLM2 visual output)."""
    return rules_for(llm_architecture, folds_visual_output(llm_architecture, text_config))


def _forward_op(rule, inputs, text_config):
    if rule.op == RENAME:
        return inputs
    if rule.op == COPY:
        return inputs * len(rule.targets)
    if rule.op == SPLIT_WQKV:
        heads = (text_config.num_attention_heads, text_config.num_key_value_heads, text_config.head_dim)
        return split_internlm2_wqkv(inputs[0], *heads)
    if rule.op == FOLD:
        wo_ve, wo = inputs
        return (fold_chained_projection(wo, wo_ve),)
    if rule.op == FOLD_BIAS:
        b_ve, w_ve, b = inputs
        return (fold_chained_bias(b, w_ve, b_ve),)
    raise ValueError(f"unknown op {rule.op!r}")


def _inverse_op(rule, outputs, extra_inputs, text_config):
    if rule.op in (RENAME, COPY):
        return outputs[0]
    if rule.op == SPLIT_WQKV:
        heads = (text_config.num_attention_heads, text_config.num_key_value_heads, text_config.head_dim)
        return merge_internlm2_wqkv(*outputs, *heads)
    if rule.op == FOLD:  # approximate: recovers wo_ve from W_ve @ W and W
        (wo,) = extra_inputs
        return unfold_chained_projection(outputs[0], wo)
    if rule.op == FOLD_BIAS:  # b_ve = folded_b - W_ve @ b
        w_ve, b = extra_inputs
        return (outputs[0].double() - w_ve.double() @ b.double()).to(outputs[0].dtype)
    raise ValueError(f"unknown op {rule.op!r}")


def _format(templates, bindings):
    return tuple(t.format(**bindings) for t in templates)


def match_source(rules, key):
    """(rule, bindings) of the rule whose primary original template matches `key`, or (None, None)."""
    for rule in rules:
        m = rule.source_pattern.fullmatch(key)
        if m:
            return rule, m.groupdict()
    return None, None


class KeyMismatchError(ConversionError):
    """The checkpoint's tensors are not the ones its config implies (missing / unexpected / misshapen)."""


def _list(keys, limit=20):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _apply(rule, bindings, key, original, text_config):
    sources = _format(rule.sources, bindings)
    missing = [s for s in sources if s not in original]
    if missing:
        raise KeyMismatchError(f"{key} needs {_list(missing)}, which the checkpoint lacks")
    outputs = _forward_op(rule, tuple(original[s] for s in sources), text_config)
    return sources, dict(zip(_format(rule.targets, bindings), outputs))


def convert_rule(rule, bindings, key, original, text_config):
    """{our key: tensor} that `rule` (matched to the original `key` with `bindings`) produces, reading
    its inputs from `original` (any mapping, lazy ones included)."""
    return _apply(rule, bindings, key, original, text_config)[1]


def rule_targets(rule, bindings):
    """Our keys `rule` produces for `bindings` (no tensor is read)."""
    return _format(rule.targets, bindings)


def convert_tensor(key, original, llm_architecture, text_config):
    """{our key: tensor} produced from the original tensor `key` (plus the extra inputs its rule needs,
    looked up in `original`); empty for a dropped key."""
    rule, bindings = match_source(rules_for_config(llm_architecture, text_config), key)
    if rule is None:
        raise KeyMismatchError(f"unexpected key (not in the original NaViL layout): {key}")
    return _apply(rule, bindings, key, original, text_config)[1] if rule.targets else {}


def convert_state_dict(original, llm_architecture, text_config, progress=None):
    """Original-layout tensors -> our layout. Raises `KeyMismatchError` on keys no rule consumes.

    The InternLM2 visual output is renamed (`text_config.chain_visual_output`) or folded (otherwise).
    `progress` is an optional callable called once per original key (a tqdm `update`)."""
    return apply_rules(original, rules_for_config(llm_architecture, text_config), text_config, progress)


def apply_rules(original, rules, text_config, progress=None, layout="the original NaViL layout"):
    """`original` through compiled `rules` (every key must match one; `layout` names them in errors).
    `text_config` gives the head counts the wqkv split needs."""
    converted = {}
    for target, tensor in iter_converted(original, rules, text_config, progress, layout):
        converted[target] = tensor
    return converted


def plan_conversion(keys, rules, layout="the original NaViL layout"):
    """Match every original key to its rule by name only (no tensor is read): `[(key, rule, bindings)]`
    for the keys that produce tensors, in `keys` order. Raises `KeyMismatchError` on a key no rule
    matches, a tensor a rule needs that is absent, a tensor nothing uses, or two keys with one target."""
    keys = list(keys)
    present = set(keys)
    plan, consumed, unmatched, targets = [], set(), [], set()
    for key in keys:
        rule, bindings = match_source(rules, key)
        if rule is None:
            unmatched.append(key)
            continue
        consumed.add(key)
        if not rule.targets:
            continue
        sources = _format(rule.sources, bindings)
        missing = [s for s in sources if s not in present]
        if missing:
            raise KeyMismatchError(f"{key} needs {_list(missing)}, which the checkpoint lacks")
        consumed.update(sources)
        for target in _format(rule.targets, bindings):
            if target in targets:
                raise KeyMismatchError(f"two original tensors map to {target} (second: {key})")
            targets.add(target)
        plan.append((key, rule, bindings))
    if unmatched:
        raise KeyMismatchError(f"unexpected keys (not in {layout}): {_list(unmatched)}")
    leftover = present - consumed
    if leftover:  # cannot happen with consistent tables; kept as the "every tensor used" guarantee
        raise KeyMismatchError(f"original tensors not used by the conversion: {_list(leftover)}")
    return plan


def iter_converted(original, rules, text_config, progress=None, layout="the original NaViL layout"):
    """Original-layout tensors -> ours, one rule at a time: yields `(our key, tensor)`. `original` may be
    a lazy mapping (tensors are read when their rule runs); every name is checked before the first read
    (`plan_conversion`). `progress()` is called once per original key that produces tensors."""
    for key, rule, bindings in plan_conversion(original.keys(), rules, layout):
        yield from _apply(rule, bindings, key, original, text_config)[1].items()
        if progress is not None:
            progress()


def iter_original_tensors(state_dict, llm_architecture, text_config, exact_only=False):
    """Our layout -> original layout, one tensor at a time: yields `(original key, tensor)`.

    `state_dict` may be any mapping (a lazy reader of safetensors files works: tensors are fetched
    one rule at a time). Renames (the chained InternLM2 `o_proj_ve` included) and the wqkv merge are
    exact. A folded InternLM2 `o_proj_ve` (`W_ve @ W`, `text_config.chain_visual_output` False) has no
    exact inverse: with `exact_only=True` its original key is yielded with `None`; otherwise it is
    recovered by least squares (approximately). Raises `KeyMismatchError` (after the last tensor) if a
    key has no original counterpart.
    """
    rules = rules_for_config(llm_architecture, text_config)
    keys = list(state_dict.keys())
    consumed, restored = set(), {}  # restored: exact results the inexact inverses need
    for exact_pass in (True, False):  # exact rules first: the inexact inverses need their results
        for rule in rules:
            if not rule.targets or rule.exact != exact_pass:
                continue
            primary = rule.target_patterns[0]
            for key in keys:
                m = primary.fullmatch(key)
                if not m:
                    continue
                bindings = m.groupdict()
                targets = _format(rule.targets, bindings)
                missing = [t for t in targets if t not in state_dict]
                if missing:
                    raise KeyMismatchError(f"{key} needs {_list(missing)}, which the state dict lacks")
                consumed.update(targets)
                sources = _format(rule.sources, bindings)
                if not rule.exact and exact_only:
                    yield sources[0], None
                    continue
                extra = tuple(restored[s] for s in sources[1:])
                tensor = _inverse_op(rule, tuple(state_dict[t] for t in targets), extra, text_config)
                if not exact_only:
                    restored[sources[0]] = tensor
                yield sources[0], tensor
                del tensor  # a lazy reader's tensor is freed as soon as the consumer drops it
    unexpected = set(keys) - consumed
    if unexpected:
        raise KeyMismatchError(f"keys with no original counterpart: {_list(unexpected)}")


def to_original_state_dict(state_dict, llm_architecture, text_config, exact_only=False):
    """`iter_original_tensors` collected: `(original_state_dict, keys_not_reproduced)`."""
    original, not_reproduced = {}, []
    for key, tensor in iter_original_tensors(state_dict, llm_architecture, text_config, exact_only):
        if tensor is None:
            not_reproduced.append(key)
        else:
            original[key] = tensor
    return original, not_reproduced


# ---------------------------------------------------------------------------------------------------
# Lazy views: tensors made when they are looked up, so conversions stream whatever the size


class LazyWeights:
    """A read-only mapping whose values are made when looked up: `{key: zero-argument function}`.
    Anything that reads a state dict key by key (a shard writer, accelerate's offload hooks) then holds
    one tensor at a time."""

    def __init__(self, makers=None):
        self._makers = dict(makers or {})

    def add(self, key, maker):
        self._makers[key] = maker

    def keys(self):
        return self._makers.keys()

    def __iter__(self):
        return iter(self._makers)

    def __len__(self):
        return len(self._makers)

    def __contains__(self, key):
        return key in self._makers

    def __getitem__(self, key):
        return self._makers[key]()


def _made(rule, bindings, key, original, text_config, target):
    return convert_rule(rule, bindings, key, original, text_config)[target]


def rule_view(original, plan, text_config):
    """Our keys -> the tensors their rules (`plan_conversion`) make from `original`, lazily."""
    view = LazyWeights()
    for key, rule, bindings in plan:
        for target in rule_targets(rule, bindings):
            view.add(target, functools.partial(_made, rule, bindings, key, original, text_config, target))
    return view


def _cast(weights, key, dtype):
    tensor = weights[key]
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def cast_view(weights, dtype):
    """`weights` with every floating tensor cast to `dtype` when it is read."""
    return LazyWeights({key: functools.partial(_cast, weights, key, dtype) for key in weights.keys()})
