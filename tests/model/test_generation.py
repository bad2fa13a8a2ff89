"""Equivalence tests of generation features against explicit references.

Every test compares a transformers generation / training feature (cache, beam search with packed
images, assisted decoding, static cache, torch.compile, disk offload, gradient checkpointing,
generated special tokens, inputs_embeds, hidden states and attentions) with a reference computed
independently: greedy token ids at zero tolerance (float32, eager attention), logits to a few float32
ulps of their magnitude (`tiny.fp_tolerance`), or exactly where the computation is the same.
"""

import tempfile

import pytest
import torch
import torch.nn.functional as F

from tiny import (
    IMG_CONTEXT,
    SPECIAL_IDS,
    assert_fp_close,
    fp_tolerance,
    multimodal_inputs,
    tiny_config,
    tiny_model,
    write_hub_folder,
)

GRIDS = [(4, 4), (6, 8), (10, 6)]  # three scales; window 4 splits the larger ones into edge windows
VARIANTS = {
    "qwen3": dict(qk_norm=True),  # per-head q/k norms, o_proj_ve alone
    "internlm2": dict(qk_norm=False, chain_visual_output=True),  # no q/k norms, o_proj_ve(o_proj(x))
}
NO_EOS = 127  # a token id the tiny models are never made to generate; eos disabled via min_new_tokens too
REF, REF_END, BOX = SPECIAL_IDS[8], SPECIAL_IDS[7], SPECIAL_IDS[1]  # <ref>, </ref>, <box>


def _report(name, a, b):
    diff = (a - b).abs()
    print(f"{name}: max {diff.max().item():.3g} mean {diff.mean().item():.3g}")
    return diff.max().item()


def _model(seed, variant="qwen3", attn="eager"):
    model = tiny_model(seed=seed, attn=attn, **VARIANTS[variant])
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = NO_EOS
    return model


def _greedy(n):
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _text_inputs():
    return {"input_ids": torch.tensor([[20, 21, 22, 23, 24, 25]])}


def _cache_of(output):
    """The output's KV cache whatever the field is called (`cache` from 5.24, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def _pair():
    """Two different samples of the SAME length (so no padding is involved): different images,
    different numbers of scales and grids, different text."""
    a = multimodal_inputs([(4, 4), (6, 4)], seed=1)
    b = multimodal_inputs([(4, 6)], text_before=(40, 41, 42), text_after=(50, 51), seed=2)
    missing = a["input_ids"].shape[1] - b["input_ids"].shape[1]
    b = multimodal_inputs([(4, 6)], text_before=tuple(range(40, 43 + missing)), text_after=(50, 51), seed=2)
    assert a["input_ids"].shape == b["input_ids"].shape
    assert not torch.equal(a["image_grid_thw"][:1], b["image_grid_thw"][:1])
    return a, b


def _batch(samples):
    """A batch of equal-length samples: rows stacked, images packed in sample order."""
    return dict(
        input_ids=torch.cat([s["input_ids"] for s in samples]),
        mm_token_type_ids=torch.cat([s["mm_token_type_ids"] for s in samples]),
        pixel_values=torch.cat([s["pixel_values"] for s in samples]),
        image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]),
    )


def _replicated(samples, n):
    """The explicit reference for an expansion by n: every sample's rows repeated n times
    (adjacent, as generate orders them) and its images packed n times, in sample order."""
    return _batch([s for s in samples for _ in range(n)])


def _embeds_with_image(model, inputs, table_until=None):
    """Reference input embeddings built in the test: the plain embedding matrix, the 12-token table
    at special positions below `table_until` (None: all), connector outputs scattered into the
    <IMG_CONTEXT> slots."""
    ids = inputs["input_ids"]
    embeds = model.model.language_model.embed_tokens.weight[ids]
    table = model.model.special_token_embedding.weight
    match = ids.unsqueeze(-1) == torch.tensor(SPECIAL_IDS)
    use_table = match.any(-1, keepdim=True)
    if table_until is not None:
        use_table = use_table & (torch.arange(ids.shape[1]) < table_until)[None, :, None]
    embeds = torch.where(use_table, table[match.long().argmax(-1)], embeds)
    if inputs.get("pixel_values") is None:
        return embeds
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    features = _feature_tensor(features)
    return embeds.masked_scatter((ids == IMG_CONTEXT).unsqueeze(-1), features.to(embeds.dtype))


def _feature_tensor(features):
    """get_image_features may return a tensor or (transformers 5 style) a model output."""
    if torch.is_tensor(features):
        return features
    for name in ("pooler_output", "last_hidden_state"):
        value = getattr(features, name, None)
        if value is not None:
            return torch.cat(list(value)) if isinstance(value, (list, tuple)) else value
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features


class _FirstForward:
    """Records the keyword arguments of the first forward call (generate's prefill)."""

    def __init__(self, model):
        self.kwargs = None
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.kwargs is None:
            assert not args, "generate calls the model with keyword arguments"
            self.kwargs = dict(kwargs)

    def replay_inputs(self):
        """The prefill inputs, run again without any cache."""
        drop = {"cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position", "return_dict"}
        return {k: v for k, v in self.kwargs.items() if k not in drop}


# ------------------------------------------------------------------------------ 1. cache vs no cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_greedy_cache_equals_no_cache(variant, with_image):
    model = _model(seed=3, variant=variant)
    inputs = multimodal_inputs(GRIDS) if with_image else _text_inputs()
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **_greedy(8))
        uncached = model.generate(**inputs, use_cache=False, **_greedy(8))
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached), f"cached {cached[0, -8:].tolist()} != uncached {uncached[0, -8:].tolist()}"


def test_generated_image_token_routing_same_with_and_without_cache():
    """A generated <IMG_CONTEXT> (no image behind it) must be routed the same way by a cached
    decode step and by a no-cache forward of the whole sequence: cached == uncached greedy."""
    model = _model(seed=3)
    with torch.no_grad():  # make <IMG_CONTEXT> the argmax of the first steps
        model.lm_head.weight[IMG_CONTEXT] = model.model.language_model.norm.weight * 5
        cached = model.generate(**_text_inputs(), use_cache=True, **_greedy(6))
        uncached = model.generate(**_text_inputs(), use_cache=False, **_greedy(6))
    assert IMG_CONTEXT in cached[0, 6:].tolist()
    assert torch.equal(cached, uncached), f"cached {cached[0, -6:].tolist()} != uncached {uncached[0, -6:].tolist()}"


# ------------------------------------------------------------------------------ 2. beam search / expansion


def test_replicated_batch_reference_is_exact():
    """Sanity of the reference used below: the explicitly replicated batch gives each original
    sample's logits on every one of its rows."""
    model = _model(seed=5)
    a, b = _pair()
    with torch.no_grad():
        ref = [model(**a).logits[0], model(**b).logits[0]]
        logits = model(**_replicated([a, b], 3)).logits
    for row in range(6):
        assert_fp_close(f"replicated row {row}", logits[row], ref[row // 3])


@pytest.mark.parametrize(
    "kwargs, expand",
    [
        (dict(num_beams=2, num_return_sequences=2, do_sample=False), 2),
        (dict(num_beams=3, num_return_sequences=2, do_sample=False), 3),
        (dict(num_return_sequences=3, do_sample=True), 3),
    ],
    ids=["beams2-ret2", "beams3-ret2", "sample-ret3"],
)
def test_generate_expands_packed_images_per_sample(kwargs, expand):
    """What generate feeds the model at prefill, after expanding the batch for beams / returned
    sequences, must be the explicitly replicated batch: every expanded row's logits equal its
    original sample's (1e-5). `repeat_interleave` on the packed [P, 3, 16, 16] pixel_values and
    [S, 3] image_grid_thw rows breaks the patch/grid correspondence."""
    model = _model(seed=5)
    a, b = _pair()
    spy = _FirstForward(model)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**_batch([a, b]), max_new_tokens=2, min_new_tokens=2, **kwargs)
        spy.handle.remove()
        inputs = spy.replay_inputs()
        assert inputs["input_ids"].shape[0] == 2 * expand
        assert torch.equal(inputs["input_ids"], _replicated([a, b], expand)["input_ids"])
        ref = [model(**a).logits[0], model(**b).logits[0]]
        logits = model(**inputs, use_cache=False).logits
    assert out.shape[0] == 2 * kwargs["num_return_sequences"]
    for row in range(2 * expand):
        assert_fp_close(f"expanded row {row} vs sample {row // expand}", logits[row], ref[row // expand])


def _reference_beam_search(model, sample, num_beams, steps, num_return):
    """Plain beam search, every step a full no-cache forward of each beam on its own (batch 1,
    one image copy): keep the `num_beams` best cumulative log-probabilities over beams x vocab. With
    no eos reachable every beam has the same length, so the final ranking is by that sum."""
    prompt = sample["input_ids"]
    beams = [(0.0, prompt)]
    for _ in range(steps):
        candidates = []
        for score, ids in beams:
            # generated tokens are text tokens (generate extends mm_token_type_ids with zeros)
            mm = sample.get("mm_token_type_ids", torch.zeros_like(prompt))
            inputs = dict(sample, input_ids=ids, mm_token_type_ids=F.pad(mm, (0, ids.shape[1] - prompt.shape[1])))
            logprobs = model(**inputs, num_prompt_tokens=prompt.shape[1]).logits[0, -1].float().log_softmax(-1)
            logprobs[NO_EOS] = -float("inf")
            top = logprobs.topk(num_beams)
            candidates += [(score + v, ids, t) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: -c[0])
        beams = [(score, torch.cat([ids, torch.tensor([[token]])], 1)) for score, ids, token in candidates[:num_beams]]
    return torch.cat([ids for _, ids in beams[:num_return]])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_beam_search_equals_reference(variant, with_image):
    """Beam search (3 beams, 2 returned) equals a plain reference beam search that runs every beam
    as its own batch-1 no-cache forward (so no expansion of packed images is involved)."""
    model = _model(seed=6, variant=variant)
    sample = _pair()[0] if with_image else _text_inputs()
    with torch.no_grad():
        out = model.generate(**sample, num_beams=3, num_return_sequences=2, **_greedy(5))
        reference = _reference_beam_search(model, sample, num_beams=3, steps=5, num_return=2)
    assert torch.equal(out, reference), f"beam search {out[:, -5:].tolist()} != reference {reference[:, -5:].tolist()}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_beam_search_with_images_batch_equals_single(variant):
    """Beam search (3 beams, 2 returned) on a batch of two different image samples (different
    images, scales and grids) equals the same beam search on each sample alone."""
    model = _model(seed=6, variant=variant)
    a, b = _pair()
    kwargs = dict(num_beams=3, num_return_sequences=2, **_greedy(5))
    length = a["input_ids"].shape[1]
    with torch.no_grad():
        batched = model.generate(**_batch([a, b]), **kwargs)
        singles = [model.generate(**s, **kwargs) for s in (a, b)]
    for i, single in enumerate(singles):
        assert torch.equal(batched[2 * i : 2 * i + 2], single), (
            f"sample {i} batched: {batched[2 * i : 2 * i + 2, length:].tolist()} != alone {single[:, length:].tolist()}"
        )


# ------------------------------------------------------------------------------ 3. assisted decoding


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prompt_lookup_equals_greedy_with_image(variant):
    model = _model(seed=7, variant=variant)
    inputs = multimodal_inputs(GRIDS, text_before=(20, 21, 22, 23, 20, 21, 22), text_after=(20, 21, 22, 30, 20, 21))
    with torch.no_grad():
        plain = model.generate(**inputs, **_greedy(10))
        lookup = model.generate(**inputs, prompt_lookup_num_tokens=3, **_greedy(10))
    assert torch.equal(lookup, plain), f"prompt lookup {lookup[0, -10:].tolist()} != greedy {plain[0, -10:].tolist()}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_assisted_generation_equals_greedy_with_image(variant):
    model = _model(seed=8, variant=variant)
    assistant = _model(seed=9, variant=variant)
    inputs = multimodal_inputs(GRIDS)
    with torch.no_grad():
        plain = model.generate(**inputs, **_greedy(10))
        assisted = model.generate(**inputs, assistant_model=assistant, **_greedy(10))
    assert torch.equal(assisted, plain), f"assisted {assisted[0, -10:].tolist()} != greedy {plain[0, -10:].tolist()}"


# ------------------------------------------------------------------------------ 4. static cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_static_cache_equals_dynamic(variant, with_image):
    model = _model(seed=10, variant=variant)
    inputs = multimodal_inputs(GRIDS) if with_image else _text_inputs()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **_greedy(8))
        static = model.generate(**inputs, cache_implementation="static", **_greedy(8))
    assert torch.equal(static, dynamic), f"static {static[0, -8:].tolist()} != dynamic {dynamic[0, -8:].tolist()}"


# ------------------------------------------------------------------------------ 5. torch.compile


def test_compiled_forward_decodes_like_eager():
    """A text-only cached greedy decode through `torch.compile(model.forward)` (dynamo with the
    eager backend: the tracing is what is tested, cheaply) gives eager's tokens."""
    torch._dynamo.reset()
    model = _model(seed=11)
    inputs = _text_inputs()
    with torch.no_grad():
        eager = model.generate(**inputs, **_greedy(4))
        model.forward = torch.compile(model.forward, backend="eager")
        try:
            compiled = model.generate(**inputs, **_greedy(4))
        finally:
            del model.forward
            torch._dynamo.reset()
    assert torch.equal(compiled, eager), f"compiled {compiled[0, -4:].tolist()} != eager {eager[0, -4:].tolist()}"


def test_image_forward_has_few_graph_breaks():
    """The host-side image layout should be one region outside the graph, not dozens of breaks."""
    torch._dynamo.reset()
    model = _model(seed=11)
    inputs = multimodal_inputs(GRIDS[:2])
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(**inputs)
    print(f"graph breaks on an image forward: {explanation.graph_break_count}")
    for reason in explanation.break_reasons[:40]:
        print("  ", str(reason.reason).splitlines()[0][:160])
    assert explanation.graph_break_count <= 6, f"{explanation.graph_break_count} graph breaks on an image forward"


# ------------------------------------------------------------------------------ 6. disk offload


def test_disk_offload_gives_same_logits():
    from transformers import AutoModel

    model = _model(seed=12)
    inputs = multimodal_inputs(GRIDS)
    device_map = {
        "model.vision_model.patch_embed": "disk",
        "model.vision_model.layers.0": "cpu",
        "model.vision_model.layers.1": "disk",
        "model.connector": "cpu",
        "model.special_token_embedding": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "disk",
        "model.language_model.layers.1": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as offload, torch.no_grad():
        write_hub_folder(model, folder)
        loaded = AutoModel.from_pretrained(
            folder, trust_remote_code=True, attn_implementation="eager", device_map=device_map, offload_folder=offload
        ).eval()
        assert loaded.model.vision_model.patch_embed.weight.device.type == "meta", "patch_embed is not offloaded"
        offloaded = loaded(**inputs).logits
        reference = model(**inputs).logits
    assert _report("disk-offloaded vs in-memory logits", offloaded, reference) <= 1e-5


# ------------------------------------------------------------------------------ 7. gradient checkpointing


def _gradients(model, inputs, **kwargs):
    model.zero_grad()
    out = model(**inputs, labels=inputs["input_ids"], **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_checkpointing_with_use_cache_in_training(variant):
    """Training with gradient checkpointing and use_cache=True fills no cache and gives the same
    gradients as training without checkpointing (every k/v projection, both experts, included)."""
    model = _model(seed=13, variant=variant)
    inputs = multimodal_inputs(GRIDS)
    model.train()
    ref_out, ref = _gradients(model, inputs, use_cache=False)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # renamed in 5.24
    out, grads = _gradients(model, inputs, use_cache=True)
    cache = _cache_of(out)
    assert cache is None or cache.get_seq_length() == 0, "training with gradient checkpointing filled a KV cache"
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-6, atol=0)
    names = [n for n, _ in model.named_parameters()]
    for proj in ("k_proj", "v_proj", "k_proj_ve", "v_proj_ve"):
        for layer in range(model.config.text_config.num_hidden_layers):
            name = f"model.language_model.layers.{layer}.self_attn.{proj}.weight"
            assert name in names
            assert name in ref and ref[name].abs().max() > 0, f"reference has no gradient for {name}"
            assert name in grads and grads[name].abs().max() > 0, f"no gradient for {name} with checkpointing"
    assert any(n.endswith("_ve.weight") for n in grads)
    assert sorted(grads) == sorted(ref), f"parameters with gradients differ: {sorted(set(ref) ^ set(grads))}"
    for n in ref:
        scale = ref[n].abs().max().item()
        diff = (grads[n] - ref[n]).abs().max().item()
        assert diff <= 1e-6 * scale + 1e-12, f"{n}: gradient differs by {diff:.3g} (max {scale:.3g})"


# ------------------------------------------------------------------------------ 8. generated special tokens


def _table_model(table, seed=4):
    model = _model(seed=seed)
    model.config.special_token_table = table
    return model


def test_special_token_table_defaults_to_prompt():
    assert tiny_config().special_token_table == "prompt"


@pytest.mark.parametrize("table", ["prompt", "everywhere"])
def test_generated_special_token_embedding_follows_config(table):
    """Cached greedy decoding where <ref> is generated at every step: the step logits equal a full
    no-cache forward where the table applies at every position ("everywhere") or at the prompt
    positions only ("prompt", SPEC §8.3). The two references differ, so the test tells them apart."""
    model = _table_model(table)
    with torch.no_grad():  # make <ref> the argmax of every step
        model.lm_head.weight[REF] = model.model.language_model.norm.weight * 50
    inputs = {"input_ids": torch.tensor([[20, BOX, 21, 22, REF, 30, REF_END, 31]])}
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, **_greedy(4), return_dict_in_generate=True, output_logits=True)
        ids = out.sequences
        assert ids[0, length:].tolist() == [REF] * 4
        references = {}
        for name, until in (("everywhere", None), ("prompt", length)):
            embeds = _embeds_with_image(model, {"input_ids": ids}, table_until=until)
            references[name] = model(inputs_embeds=embeds, use_cache=False).logits[0, length - 1 : -1]
        everywhere, prompt_only = references["everywhere"], references["prompt"]
    steps = torch.stack([step[0] for step in out.logits])
    expected = everywhere if table == "everywhere" else prompt_only
    other = prompt_only if table == "everywhere" else everywhere
    # float32 logits up to ~645 (the boosted <ref>): the tolerance scales with them (tiny.FP_ULPS); the two
    # references differ by ~645, far above it, so the same tolerance tells them apart
    separating = 100 * fp_tolerance(expected)
    assert _report("table everywhere vs prompt only", everywhere[1:], prompt_only[1:]) > separating
    assert_fp_close(f"generate ({table}) vs its reference", steps, expected)
    assert _report(f"generate ({table}) vs the other reference", steps[1:], other[1:]) > separating


def test_everywhere_model_trained_on_special_tokens_regenerates_them():
    """Overfit one sequence with special tokens (teacher forcing embeds them with the table);
    with special_token_table="everywhere" greedy decoding from its prefix regenerates it."""
    torch.manual_seed(0)
    model = _table_model("everywhere", seed=14)
    sequence = torch.tensor([[20, 21, 22, REF, 40, 41, REF_END, BOX, 50, 51, 52, 53, SPECIAL_IDS[0], 60, 61]])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = model(input_ids=sequence, labels=sequence).loss
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"final training loss {loss.item():.4f}")
    prefix = 3
    with torch.no_grad():
        out = model.generate(input_ids=sequence[:, :prefix], **_greedy(sequence.shape[1] - prefix))
    assert out.tolist() == sequence.tolist()


# ------------------------------------------------------------------------------ 9. inputs_embeds


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inputs_embeds_with_pixel_values_equals_input_ids(variant):
    model = _model(seed=15, variant=variant)
    inputs = multimodal_inputs(GRIDS, text_before=(20, REF, 21, REF_END), text_after=(BOX, 30, 31))
    ids = inputs.pop("input_ids")
    with torch.no_grad():
        reference = model(input_ids=ids, **inputs).logits
        embeds = model.get_input_embeddings()(ids)
        logits = model(inputs_embeds=embeds, **inputs).logits
    assert _report("inputs_embeds vs input_ids (image)", logits, reference) <= 1e-5


def test_input_embeddings_apply_the_special_table():
    """get_input_embeddings()(input_ids) is what the model embeds input_ids with: the 12-token
    table at special positions, and the same logits as input_ids."""
    model = _model(seed=15)
    ids = torch.tensor([[20, REF, 21, REF_END, BOX, 22, SPECIAL_IDS[0], 23]])
    table = model.model.special_token_embedding.weight
    plain = model.model.language_model.embed_tokens.weight
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        for pos, token in enumerate(ids[0].tolist()):
            expected = table[SPECIAL_IDS.index(token)] if token in SPECIAL_IDS else plain[token]
            assert torch.equal(embeds[0, pos], expected), f"position {pos} (token {token})"
        logits = model(inputs_embeds=embeds).logits
        reference = model(input_ids=ids).logits
    assert _report("inputs_embeds vs input_ids (special tokens)", logits, reference) <= 1e-5


# ------------------------------------------------------------------------------ 10. output fields


def test_hidden_states_attentions_and_tuple_outputs():
    model = _model(seed=16)
    inputs = multimodal_inputs(GRIDS)
    b, length = inputs["input_ids"].shape
    text = model.config.text_config
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        hidden, attentions = out.hidden_states, out.attentions
        assert isinstance(hidden, tuple) and len(hidden) == text.num_hidden_layers + 1
        assert all(h.shape == (b, length, text.hidden_size) for h in hidden)
        assert _report("lm_head(hidden_states[-1]) vs logits", model.lm_head(hidden[-1]), out.logits) <= 1e-5
        assert isinstance(attentions, tuple) and len(attentions) == text.num_hidden_layers
        for a in attentions:
            assert a.shape == (b, text.num_attention_heads, length, length)
            assert_fp_close("attention row sums", a.sum(-1), torch.ones(()))
            assert a.triu(1).abs().max() == 0, "attention is not causal"
        # the image features the LLM received (connector output), or the vision encoder's output
        image_hidden = getattr(out, "image_hidden_states", None)
        assert image_hidden is not None, "the output carries no image_hidden_states"
        image_hidden = torch.cat(list(image_hidden)) if isinstance(image_hidden, (list, tuple)) else image_hidden
        features = _feature_tensor(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
        encoder = _feature_tensor(model.model.vision_model(inputs["pixel_values"], inputs["image_grid_thw"]))
        reference = features if image_hidden.numel() == features.numel() else encoder
        assert _report("image_hidden_states", image_hidden.reshape(reference.shape), reference) <= 1e-6

        plain = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)
        with_labels = model(**inputs, labels=inputs["input_ids"], return_dict=False)
        assert with_labels[0].ndim == 0 and torch.equal(with_labels[1], plain.logits)
