"""`navil convert`: an original OpenGVLab NaViL checkpoint (SPEC §7) -> a Hub-ready folder (API.md).

Steps: read the original config and every safetensors shard; check the tensor names and shapes against
what the config implies; map the config and the tensors (`keymap.py`, `surgery.py`); write the folder
into a temporary directory beside the output; verify it; only then move it into place. On any failure
the temporary directory is removed and nothing is written.

InternLM2's visual tokens get the chained output projection `wo_ve(wo(x))` (SPEC §8.2). By default it is
kept chained (`text_config.chain_visual_output=True`, `wo_ve` renamed to a hidden->hidden `o_proj_ve`), so
the conversion is exact both ways and `navil convert --to-original` (`back.py`) reproduces the original
bit for bit. `--fold-visual-output` (inference-only deployments) stores one `o_proj_ve = W_ve @ W` instead
(float64 product; one matmul less per visual token); a folded folder cannot be converted back exactly.

Verification (`--verify`, the default):

1. every original tensor is consumed by the key map (checked during conversion);
2. converting the *written* weights back to the original layout reproduces every original tensor bit
   for bit (in the output dtype); with `--fold-visual-output` the InternLM2 folded `o_proj_ve` has no
   exact inverse, so there the fold of the original `wo_ve`, `wo` must equal the written tensor bit for bit;
3. the written safetensors hold exactly the in-memory model's tensors (bitwise);
4. the written tokenizer encodes a probe text like the original tokenizer;
5. the folder, loaded through `AutoModel`/`AutoProcessor.from_pretrained(..., trust_remote_code=True)`
   with no missing or unexpected weights, gives the same logits as the in-memory model on a short chat
   prompt with one small image.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConversionError, VerificationError
from .hub import (
    build_generation_config,
    build_processor,
    model_card,
    model_from_state_dict,
    read_license,
    write_hub_folder,
)
from .keymap import convert_state_dict, convert_tensor, iter_original_tensors, match_source, rules_for
from .original import (
    check_original_state_dict,
    convert_config,
    embedding_key,
    llm_architecture,
    lm_head_key,
    load_original_config,
    load_original_state_dict,
    special_token_ids,
    weight_files,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
)  # fmt: skip
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
PROBE_TEXT = "Describe the image.\n<|im_start|>user\n<img><IMG_CONTEXT></img> 1+1=2, ünïcödé 中文"
PROBE_QUESTION = "Describe the image."


@dataclass
class ConversionResult:
    out_dir: Path
    config: object
    dtype: torch.dtype
    num_original_tensors: int
    num_written_tensors: int
    verified: bool
    checks: dict = field(default_factory=dict)  # name -> short description of what was checked and the outcome
    seconds: float = 0.0


def checkpoint_dtype(state_dict):
    """A checkpoint's floating dtype: the most common one by element count (float32 if none)."""
    counts = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def print_checks(result, file=None):
    """One line per verification check of a conversion result (or that it was not verified)."""
    for name, outcome in result.checks.items():
        print(f"  verified {name}: {outcome}", file=file)
    if not result.verified:
        print("  not verified (--no-verify)", file=file)


def resolve_dtype(dtype, auto_dtype):
    """A torch dtype as it is, `"auto"` (or `None`) as `auto_dtype` (the source's), otherwise a `DTYPES` name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return auto_dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cast(state_dict, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}


@contextlib.contextmanager
def transformers_progress_bars(enabled):
    """transformers' own bars (GGUF dequantization, weight loading, saving) follow ours: off when
    `enabled` is false, restored afterwards; left as the user set them otherwise."""
    from transformers.utils import logging as hf_logging

    bars_were_disabled = not hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not bars_were_disabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def staged_folder(out_dir, force):
    """A temporary folder beside `out_dir` to build in. When the block finishes it gets the usual
    permissions and is renamed into `out_dir` (`publish`); on any failure it is removed, so nothing
    half-written is ever left. The copy of code files transformers caches for it is forgotten either way."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _normalize_permissions(tmp)
        publish(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _forget_remote_module(tmp)


def _progress_bar(enabled, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


def load_tokenizer(original_dir, trust_remote_code=False):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    # AutoTokenizer reads config.json too and warns about it (model_type navil_chat; InternLM2's legacy
    # rope_scaling key): noise about a file the tokenizer does not use.
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            return AutoTokenizer.from_pretrained(str(original_dir), trust_remote_code=trust_remote_code)
    except Exception as e:
        hint = "" if trust_remote_code else " (if it needs its own code, pass --trust-remote-code)"
        raise ConversionError(f"cannot load the tokenizer in {original_dir}: {e}{hint}") from e
    finally:
        logging.set_verbosity(verbosity)


def check_output_dir(out_dir, force):
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConversionError(f"{out_dir} exists and is not a directory")
        if not force:
            raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise ConversionError(f"the parent folder of {out_dir} does not exist")
    return out_dir


def convert_checkpoint(
    original_dir,
    out_dir,
    *,
    dtype="auto",
    force=False,
    verify=True,
    progress=False,
    max_shard_size="5GB",
    trust_remote_code=False,
    attn_implementation="eager",
    fold_visual_output=False,
    _before_publish=None,
):
    """Convert the original checkpoint in `original_dir` into a Hub-ready folder `out_dir`.

    Args:
        dtype: `"auto"` (keep the checkpoint's), `"float32"`, `"bfloat16"`, `"float16"` or a torch dtype.
        force: replace an existing `out_dir`.
        verify: run the checks listed in the module docstring before publishing.
        progress: show tqdm progress bars.
        max_shard_size: safetensors shard size (`save_pretrained`'s).
        trust_remote_code: allow the original tokenizer's own code (InternLM2 tokenizers may need it).
        attn_implementation: backend of the logits check (`eager` is deterministic everywhere).
        fold_visual_output: store InternLM2's chained visual output projection folded into one `o_proj_ve`
            (inference only: such a folder cannot be converted back to the original exactly). No effect
            on Qwen3 checkpoints.

    Returns a `ConversionResult`. Raises `ConversionError` on bad input and `VerificationError` when a
    check fails; in both cases `out_dir` is left as it was.
    """
    with transformers_progress_bars(progress):
        return _convert(
            original_dir, out_dir, dtype, force, verify, progress, max_shard_size, trust_remote_code,
            attn_implementation, fold_visual_output, _before_publish,
        )  # fmt: skip


def _convert(
    original_dir, out_dir, dtype, force, verify, progress, max_shard_size, trust_remote_code, attn_implementation,
    fold_visual_output, _before_publish,
):  # fmt: skip
    start = time.perf_counter()
    original_dir = Path(original_dir)
    out_dir = check_output_dir(out_dir, force)
    original_config = load_original_config(original_dir)
    arch = llm_architecture(original_config)
    files = weight_files(original_dir)
    tokenizer = load_tokenizer(original_dir, trust_remote_code)
    config = convert_config(original_config, special_token_ids(tokenizer), fold_visual_output=fold_visual_output)

    num_tensors = _count_tensors(files)
    with _progress_bar(progress, total=num_tensors, desc="reading", unit="tensor") as bar:
        original = load_original_state_dict(original_dir, progress=bar.update)
    check_original_state_dict({k: tuple(v.shape) for k, v in original.items()}, original_config)
    with _progress_bar(progress, total=len(original), desc="converting", unit="tensor") as bar:
        converted = convert_state_dict(original, arch, config.text_config, progress=bar.update)
    _tie_lm_head(original, converted, original_config, config)

    target = resolve_dtype(dtype, checkpoint_dtype(original))
    config.dtype = target
    model = model_from_state_dict(_cast(converted, target), config)
    model.config._attn_implementation = attn_implementation
    del converted

    try:
        processor = build_processor(tokenizer, config)
    except ValueError as e:  # e.g. a tokenizer that splits <IMG_CONTEXT>
        raise ConversionError(f"cannot build the processor from the original tokenizer: {e}") from None
    extra = [original_dir / name for name in TOKENIZER_FILES + LICENSE_FILES if (original_dir / name).is_file()]
    card = model_card(
        config, source=_source_name(original_dir), license=read_license(original_dir), dtype=target, verified=verify
    )
    checks = {}
    with staged_folder(out_dir, force) as tmp:
        steps = len(extra) + 7  # + weights, processor, 4 code files, README.md
        with _progress_bar(progress, total=steps, desc="writing", unit="file") as bar:
            write_hub_folder(
                model,
                config,
                tokenizer,
                tmp,
                processor=processor,
                generation_config=build_generation_config(tokenizer),
                model_card=card,
                extra_files=extra,
                max_shard_size=max_shard_size,
                progress=lambda description: bar.update(),
            )
        num_written, num_original = len(model.state_dict()), len(original)
        if verify:
            checks = verify_weights(tmp, original, original_config, config, model, tokenizer, target, progress)
            inputs, expected_logits = in_memory_logits(tmp, model, target, attn_implementation)
        del model, original  # the reloaded model below must not double the memory
        if verify:
            checks["logits"] = check_reloaded_logits(tmp, inputs, expected_logits, target, attn_implementation)
        if _before_publish is not None:  # test hook: simulate a failure between verification and publishing
            _before_publish(tmp)
    return ConversionResult(
        out_dir=out_dir,
        config=config,
        dtype=target,
        num_original_tensors=num_original,
        num_written_tensors=num_written,
        verified=verify,
        checks=checks,
        seconds=time.perf_counter() - start,
    )


GENERIC_FOLDER_NAMES = ("checkpoint", "checkpoints", "model", "weights", "hf", "original")


def _source_name(original_dir):
    """A short name for the model card: the folder's name (with its parent's when the name is generic)."""
    path = Path(original_dir).resolve()
    if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _normalize_permissions(folder):
    """`mkdtemp` makes a private folder and some writers private files; give them the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in Path(folder).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _count_tensors(files):
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def _tie_lm_head(original, converted, original_config, config):
    """A tied checkpoint may omit its LM head: ours then shares the embedding. If it has one, it must
    equal the embedding."""
    if not config.tie_word_embeddings:
        return
    head, embed = lm_head_key(original_config), embedding_key(original_config)
    if head in original and not torch.equal(original[head], original[embed]):
        raise ConversionError(f"llm_config.tie_word_embeddings is true but {head} differs from {embed}; fix the config")
    converted["lm_head.weight"] = converted["model.language_model.embed_tokens.weight"]


def publish(tmp, out_dir, force):
    """Move the finished folder `tmp` to `out_dir` (renames only; an existing `out_dir` is replaced
    only with `force`, and restored if the move fails)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp, out_dir)
        return
    if not force:
        raise ConversionError(f"{out_dir} already exists; pass --force to replace it")
    backup = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out_dir, backup)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(backup, out_dir)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def _forget_remote_module(folder):
    """Remove the copy of the code files transformers caches for a (temporary) local folder."""
    try:
        from transformers.dynamic_module_utils import (
            HF_MODULES_CACHE,
            TRANSFORMERS_DYNAMIC_MODULE_NAME,
            _sanitize_module_name,
        )

        name = _sanitize_module_name(Path(folder).name)
        cached = Path(HF_MODULES_CACHE) / TRANSFORMERS_DYNAMIC_MODULE_NAME / name
        if name and cached.is_dir():
            shutil.rmtree(cached, ignore_errors=True)
    except Exception:  # noqa: BLE001 -- best effort: a stale cache entry is harmless
        pass


# ---------------------------------------------------------------------------------------------------
# Verification


class SafetensorsFolder:
    """Read-only mapping over the safetensors weights of a folder; tensors are read on access."""

    def __init__(self, folder):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self._weight_map = weight_map
        self._handles = {name: safe_open(str(folder / name), framework="pt") for name in set(weight_map.values())}

    def keys(self):
        return self._weight_map.keys()

    def __iter__(self):
        return iter(self._weight_map)

    def __len__(self):
        return len(self._weight_map)

    def __contains__(self, key):
        return key in self._weight_map

    def __getitem__(self, key):
        return self._handles[self._weight_map[key]].get_tensor(key)


def verify_weights(folder, original, original_config, config, model, tokenizer, dtype, progress=False):
    """The weight and tokenizer checks of the module docstring (1-4) on a written folder; raise
    `VerificationError` on the first failure. Returns {check: description}."""
    written = SafetensorsFolder(folder)
    return {
        "round trip": check_round_trip(written, original, original_config, config, dtype, progress),
        "written = in memory": check_written_equals_model(written, model),
        "tokenizer": check_tokenizer(folder, tokenizer),
    }


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_round_trip(written, original, original_config, config, dtype, progress=False):
    """Written weights -> original layout must reproduce every original tensor (cast to `dtype`) bit
    for bit; a folded InternLM2 `o_proj_ve` must equal the fold of the original tensors bit for bit."""
    arch = llm_architecture(original_config)
    rules = rules_for(arch)
    seen, folds = set(), 0
    with _progress_bar(progress, total=len(original), desc="verifying", unit="tensor") as bar:
        for key, tensor in iter_original_tensors(written, arch, config.text_config, exact_only=True):
            if key not in original:
                raise VerificationError(f"round trip: the written weights give {key}, which the original lacks")
            if tensor is None:  # folded: recompute the fold of the originals through the same code path
                ((target, folded),) = convert_tensor(key, original, arch, config.text_config).items()
                if not _same(written[target], _as(folded, dtype)):
                    raise VerificationError(f"round trip: {target} is not the fold of the original tensors ({key} ...)")
                folds += 1
            elif not _same(tensor, _as(original[key], dtype)):
                raise VerificationError(f"round trip: converting back does not reproduce {key} bit for bit")
            seen.add(key)
            bar.update()
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


def check_written_equals_model(written, model):
    state = model.state_dict()
    tied = {k for k in getattr(model, "_tied_weights_keys", {}) or {}} if model.config.tie_word_embeddings else set()
    missing = sorted(set(state) - set(written.keys()) - tied)
    unexpected = sorted(set(written.keys()) - set(state))
    if missing or unexpected:
        raise VerificationError(f"written weights: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for key in written.keys():
        if not _same(written[key], state[key].detach()):
            raise VerificationError(f"written weights: {key} differs from the converted tensor")
    return f"{len(written)} written tensors equal the converted ones bit for bit"


def check_tokenizer(folder, tokenizer):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    a, b = tokenizer.encode(PROBE_TEXT, add_special_tokens=False), reloaded.encode(PROBE_TEXT, add_special_tokens=False)
    if a != b:
        raise VerificationError(f"the written tokenizer encodes a probe text differently: {a} vs {b}")
    if reloaded.get_vocab() != tokenizer.get_vocab():
        raise VerificationError("the written tokenizer has a different vocabulary from the original")
    return f"same vocabulary ({len(a)} probe tokens identical)"


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


def in_memory_logits(folder, model, dtype, attn_implementation):
    """Probe inputs built by the folder's own processor, and the in-memory model's logits on them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    inputs = dict(probe_inputs(processor))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        return inputs, model(**inputs).logits


def check_reloaded_logits(folder, inputs, expected, dtype, attn_implementation):
    """The folder loaded through `AutoModel` (no missing/unexpected weights) must give exactly `expected`."""
    from transformers import AutoModel

    reloaded, info = AutoModel.from_pretrained(
        str(folder),
        trust_remote_code=True,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise VerificationError(f"AutoModel.from_pretrained reported {problems}")
    if type(reloaded).__name__ != "NaViLForConditionalGeneration":
        raise VerificationError(f"AutoModel loaded {type(reloaded).__name__}, expected NaViLForConditionalGeneration")
    with torch.no_grad():
        got = reloaded.eval()(**inputs).logits
    if got.shape != expected.shape or not torch.equal(got, expected):
        diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else float("nan")
        raise VerificationError(
            f"logits of the reloaded folder differ from the in-memory model (max abs diff {diff:g}, shapes "
            f"{tuple(got.shape)} vs {tuple(expected.shape)})"
        )
    return f"identical logits {tuple(got.shape)} on a {inputs['input_ids'].shape[1]}-token prompt with one image"
