"""Checks a conversion runs on the folder it wrote, before publishing it (the list is in `convert.py`'s
docstring): the round trip to the original layout, the written names and shapes, the tokenizer, and the
logits of the folder reloaded through `AutoModel`, all streamed."""

import torch

from ..errors import VerificationError
from ..folders import SafetensorsFolder, progress_bar, quiet_transformers, release_freed_memory
from ..hub import meta_model, tied_weight_keys
from .keymap import convert_tensor, iter_original_tensors, match_source, rules_for
from .original import llm_architecture, lm_head_key
from .tokenizer import check_tokenizer

PROBE_QUESTION = "Describe the image."


def verify_streamed(folder, original, original_config, config, tokenizer, dtype, progress=False):
    """The weight and tokenizer checks of a streamed conversion on its written folder (the module
    docstring's 1, 2 and 4; written = converted is checked as the shards are written): every tensor is
    read lazily, so nothing is held whole. Returns {check: description}."""
    written = SafetensorsFolder(folder)
    return {
        "round trip": check_round_trip(written, original, original_config, config, dtype, progress),
        "names and shapes": check_written_matches_model(written, config),
        "tokenizer": check_tokenizer(folder, tokenizer),
    }


def check_written_matches_model(written, config):
    """The written tensors are exactly the model's weights (those it declares tied left out), with its shapes."""
    model = meta_model(config, torch.float32)
    state = model.state_dict()
    for key in tied_weight_keys(model):
        state.pop(key, None)
    missing = sorted(set(state) - set(written.keys()))
    unexpected = sorted(set(written.keys()) - set(state))
    if missing or unexpected:
        raise VerificationError(f"written weights: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for key in written.keys():
        if written.shape(key) != tuple(state[key].shape):
            raise VerificationError(
                f"written weights: {key} has shape {written.shape(key)}, the model {tuple(state[key].shape)}"
            )
    return f"{len(state)} tensors, the model's names and shapes"


def check_offloaded_logits(folder, weights, config, dtype, attn_implementation):
    """Logits on the probe prompt, two ways that never hold the whole model: our model with its weights
    taken module by module from `weights` (the conversion's lazy view of the original checkpoint), and
    the folder loaded through `AutoModel` with every weight left on disk (no missing/unexpected
    weights). They must be identical."""
    from accelerate import cpu_offload
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    inputs = dict(probe_inputs(processor))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    model = meta_model(config, dtype)
    model.config._attn_implementation = attn_implementation
    cpu_offload(model, execution_device="cpu", state_dict=weights)
    with torch.no_grad():
        expected = model(**inputs).logits
    del model
    return check_reloaded_logits(folder, inputs, expected, dtype, attn_implementation, offload=True)


def same_tensor(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_round_trip(written, original, original_config, config, dtype, progress=False):
    """Written weights -> original layout must reproduce every original tensor (cast to `dtype`) bit
    for bit; a folded InternLM2 `o_proj_ve` must equal the fold of the original tensors bit for bit."""
    arch = llm_architecture(original_config)
    rules = rules_for(arch)
    seen, folds = set(), 0
    with progress_bar(progress, total=len(original), desc="verifying", unit="tensor") as bar:
        for key, tensor in iter_original_tensors(written, arch, config.text_config, exact_only=True):
            if key not in original:
                raise VerificationError(f"round trip: the written weights give {key}, which the original lacks")
            if tensor is None:  # folded: recompute the fold of the originals through the same code path
                ((target, folded),) = convert_tensor(key, original, arch, config.text_config).items()
                if not same_tensor(written[target], _as(folded, dtype)):
                    raise VerificationError(f"round trip: {target} is not the fold of the original tensors ({key} ...)")
                folds += 1
            elif not same_tensor(tensor, _as(original[key], dtype)):
                raise VerificationError(f"round trip: converting back does not reproduce {key} bit for bit")
            seen.add(key)
            bar.update()
            del tensor  # before the next one is read: one written and one original tensor at a time
            if len(seen) % 64 == 0:
                release_freed_memory()
    missing = set(original) - seen
    if config.tie_word_embeddings:
        missing.discard(lm_head_key(original_config))
    for key in list(missing):
        rule, _ = match_source(rules, key)
        if rule is not None and not rule.targets:  # dropped derived buffers
            missing.discard(key)
    if missing:
        raise VerificationError(f"round trip: original tensors not reproduced: {', '.join(sorted(missing)[:20])}")
    exact = len(seen) - folds
    return f"{exact} original tensors reproduced bit for bit" + (
        f", {folds} folded o_proj_ve equal to the fold of the originals" if folds else ""
    )


def _as(tensor, dtype):
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def probe_image(size=(40, 56)):
    """A small deterministic RGB test image (a colour gradient with a square)."""
    from PIL import Image

    h, w = size
    y = torch.arange(h).view(h, 1).expand(h, w)
    x = torch.arange(w).view(1, w).expand(h, w)
    rgb = torch.stack([(x * 255) // max(w - 1, 1), (y * 255) // max(h - 1, 1), ((x + y) * 7) % 256], dim=-1)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = 255
    return Image.fromarray(rgb.to(torch.uint8).numpy())  # (H, W, 3) uint8 -> RGB


def probe_inputs(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[[probe_image()]], return_tensors="pt")


def check_reloaded_logits(folder, inputs, expected, dtype, attn_implementation, offload=False):
    """The folder loaded through `AutoModel` (no missing/unexpected weights) must give exactly `expected`.
    With `offload`, every weight stays in the folder's safetensors files and is read module by module
    during the forward (accelerate's disk offload), so the check costs one layer's memory."""
    import tempfile

    from transformers import AutoModel

    offload_kwargs = {}
    scratch = None
    if offload:
        scratch = tempfile.TemporaryDirectory(prefix="navil-offload-")
        offload_kwargs = {"device_map": {"": "disk"}, "offload_folder": scratch.name}
    with quiet_transformers():
        reloaded, info = AutoModel.from_pretrained(
            str(folder),
            trust_remote_code=True,
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **offload_kwargs,
        )
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise VerificationError(f"AutoModel.from_pretrained reported {problems}")
        if type(reloaded).__name__ != "NaViLForConditionalGeneration":
            raise VerificationError(
                f"AutoModel loaded {type(reloaded).__name__}, expected NaViLForConditionalGeneration"
            )
        with torch.no_grad():
            got = reloaded.eval()(**inputs).logits
    del reloaded
    if scratch is not None:
        scratch.cleanup()
    if got.shape != expected.shape or not torch.equal(got, expected):
        diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else float("nan")
        raise VerificationError(
            f"logits of the reloaded folder differ from the converted model (max abs diff {diff:g}, shapes "
            f"{tuple(got.shape)} vs {tuple(expected.shape)})"
        )
    return f"identical logits {tuple(got.shape)} on a {inputs['input_ids'].shape[1]}-token prompt with one image"
