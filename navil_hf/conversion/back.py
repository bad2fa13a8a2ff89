"""`navil to-original`: a converted NaViL folder -> the original OpenGVLab layout (SPEC §7), for
people who keep training with the original code.

Written: `config.json` (`to_original_config`: model_type `navil_chat`, `vision_config`, `llm_config`, the
NaViL fields, and the original keys our config carried in `original_config_extras`), safetensors weights
under the original names (`keymap.iter_original_tensors`; the folder's dtype; sharded with an index above
`max_shard_size`), the tokenizer files and a short README. The original code files are not ours to ship.

Every step is exact (renames, the InternLM2 wqkv merge, the chained InternLM2 `o_proj_ve` -> `wo_ve`), so
original -> `navil convert` -> `navil to-original` gives back every original tensor bit for bit.
The one exception is a folder written with `--fold-visual-output`: its `o_proj_ve = W_ve @ W` has no exact
inverse, so it is refused unless `approximate=True` (`--approximate`), which recovers `wo_ve` by least
squares and reports the max-abs error of the refolded product.

Verification (`verify=True`, before anything is moved into place):

1. every tensor of the folder is used (checked while mapping the names);
2. the written config and weights pass the original-layout checks (`check_original_state_dict`: the
   names and shapes the written config.json implies);
3. converting the written folder forward again (`convert_config`, the key map's rules) gives our config
   and every one of our tensors bit for bit (with `--approximate`: every tensor but the folded ones, whose
   max-abs error is reported);
4. the written tokenizer encodes a probe text like the folder's.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConversionError, VerificationError
from ..folders import (
    CONFIG_FILE,
    LICENSE_FILES,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
    WEIGHT_FILES,
    SafetensorsFolder,
    ShardWriter,
    check_output_dir,
    progress_bar,
    staged_folder,
    transformers_progress_bars,
)
from .keymap import (
    KeyMismatchError,
    folds_visual_output,
    iter_original_tensors,
    plan_conversion,
    rule_view,
    rules_for_config,
    to_original_state_dict,
)
from .original import (
    ORIGINAL_MODEL_TYPE,
    OriginalCheckpointError,
    check_original_state_dict,
    convert_config,
    load_original_config,
    special_token_ids,
    to_original_config,
    weight_files,
)
from .surgery import checkpoint_dtype_of_headers
from .tokenizer import check_tokenizer, load_tokenizer
from .verify import same_tensor

OUR_MODEL_TYPE = "navil"
# Keys of our config.json that say how a folder was saved, not what the model is.
# Keys that record how a folder was saved or made (`initialized_from`: provenance `navil init-from-llm`
# writes; the original layout has no place for it).
SAVE_RECORD_KEYS = (
    "auto_map", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "_commit_hash", "initialized_from",
)  # fmt: skip


@dataclass
class BackConversionResult:
    original_dir: Path
    config: dict  # the written original config.json
    dtype: torch.dtype
    num_tensors: int  # tensors in the converted folder
    num_written_tensors: int  # tensors in the original-layout folder
    verified: bool
    approximate: bool = False
    approximation_error: float | None = None  # max-abs of refold(unfolded wo_ve) - o_proj_ve (--approximate)
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0


def convert_to_original(
    converted_dir, original_dir, *, force=False, verify=True, progress=True, approximate=False, max_shard_size="5GB"
):
    """Write the converted NaViL folder `converted_dir` in the original OpenGVLab layout at `original_dir`.

    Args:
        force: replace an existing `original_dir`.
        verify: run the checks of the module docstring before publishing.
        progress: show tqdm progress bars.
        approximate: allow a folder whose InternLM2 visual output is folded (`--fold-visual-output`):
            `wo_ve` is recovered by least squares, and the result's `approximation_error` says how far
            the refolded product is from the folder's `o_proj_ve`.
        max_shard_size: safetensors shard size.

    Returns a `BackConversionResult`. Raises `ConversionError` on bad input (not a converted folder, an
    existing output, a folded folder without `approximate`, a config the original cannot express) and
    `VerificationError` when a check fails; in both cases `original_dir` is left as it was. A model without
    visual experts (`text_config.visual_experts=False`) has no original layout: refused.
    """
    with transformers_progress_bars(progress):
        return _convert_to_original(converted_dir, original_dir, force, verify, progress, approximate, max_shard_size)


def load_converted_config(converted_dir):
    """Our `NaViLConfig` of a converted folder; a `ConversionError` names what makes it something else."""
    from configuration_navil import NaViLConfig

    converted_dir = Path(converted_dir)
    if not converted_dir.is_dir():
        raise ConversionError(f"{converted_dir} is not a directory")
    path = converted_dir / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{converted_dir} has no config.json: not a converted NaViL folder")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if model_type != OUR_MODEL_TYPE:
        hint = " (this folder is already in the original layout)" if model_type == ORIGINAL_MODEL_TYPE else ""
        raise ConversionError(
            f"{path} has model_type {model_type!r}, expected {OUR_MODEL_TYPE!r} (a folder written by "
            f"`navil convert`){hint}"
        )
    if not any((converted_dir / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(
            f"{converted_dir} has no model.safetensors (or shard index): not a converted NaViL folder"
        )
    try:
        return NaViLConfig.from_pretrained(str(converted_dir))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path} is not a valid NaViL config: {e}") from None


def folded_refusal(converted_dir):
    return ConversionError(
        f"{converted_dir} stores InternLM2's chained visual output projection folded into one o_proj_ve "
        "(W_ve @ W: written with --fold-visual-output, or by navil convert before chain_visual_output existed), "
        "so the original wo_ve cannot be recovered exactly; "
        "re-convert the original checkpoint without --fold-visual-output, or pass --approximate to recover "
        "wo_ve by least squares (the max-abs error of the refolded product is reported)"
    )


def no_experts_refusal(converted_dir):
    return ConversionError(
        f"{converted_dir} has no visual experts (text_config.visual_experts is false); the original OpenGVLab "
        "layout gives every decoder layer visual experts (*_ve weights), so it has no layout for this model"
    )


def _convert_to_original(converted_dir, original_dir, force, verify, progress, approximate, max_shard_size):
    start = time.perf_counter()
    converted_dir = Path(converted_dir)
    config = load_converted_config(converted_dir)
    original_dir = check_output_dir(original_dir, force, sources=(converted_dir,), replaces=("navil_chat",))
    text_config = config.text_config
    origin = getattr(config, "initialized_from", None) or {}
    if origin.get("family") not in (None, "qwen3", "internlm2"):
        raise ConversionError(
            f"{converted_dir} was built by navil init-from-llm from a {origin['family']} LLM; the original "
            "OpenGVLab code has only the Qwen3 and InternLM2 variants, so it has no layout for this model"
        )
    if not getattr(text_config, "visual_experts", True):
        raise no_experts_refusal(converted_dir)
    original_config = to_original_config(config)  # ConversionError if the original cannot express it
    arch = original_config["llm_config"]["architectures"][0]
    folded = folds_visual_output(arch, text_config)
    if folded and not approximate:
        raise folded_refusal(converted_dir)
    tokenizer = load_tokenizer(converted_dir)

    ours = SafetensorsFolder(converted_dir)
    dtype = checkpoint_dtype_of_headers(ours)
    original_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    checks, error = {}, None
    with staged_folder(original_dir, force) as tmp:
        if approximate and folded:  # the least-squares unfold needs every exact result: held in memory
            original, _ = to_original_state_dict(ours, arch, text_config, exact_only=False)
            num_written = _write_weights(tmp, original.items(), max_shard_size, len(original), progress)
        else:  # streamed: one rule's tensors read, inverted and written at a time
            tensors = iter_original_tensors(ours, arch, text_config, exact_only=True)
            num_written = _write_weights(tmp, tensors, max_shard_size, None, progress)
        _write(tmp, original_config, tokenizer, converted_dir)
        if verify:
            checks["original layout"] = check_original_layout(tmp)
            checks["forward again"], error = check_forward(tmp, ours, config, arch, progress)
            checks["config"] = check_config_forward(tmp, config, folded)
            checks["tokenizer"] = check_tokenizer(tmp, tokenizer)
        elif approximate and folded:
            _, error = compare_forward(original, ours, arch, text_config)
    return BackConversionResult(
        original_dir=original_dir,
        config=original_config,
        dtype=dtype,
        num_tensors=len(ours),
        num_written_tensors=num_written,
        verified=verify,
        approximate=folded,
        approximation_error=error,
        checks=checks,
        seconds=time.perf_counter() - start,
    )


def original_readme(converted_dir, original_config):
    llm = original_config["llm_config"]["architectures"][0]
    return f"""# NaViL checkpoint in the original OpenGVLab layout

Written by `navil to-original` from the converted folder `{Path(converted_dir).resolve().name}`:
`config.json` (model_type `{ORIGINAL_MODEL_TYPE}`, language model `{llm}`), the weights under the original
tensor names, and the tokenizer.

This folder holds no code: to run it with the original NaViL code (e.g. to keep training), add the
original code files from OpenGVLab's NaViL repository (the Python files of its Hub model repos), which
the `navil` package does not ship. `navil convert` turns this folder back into the `transformers` format.
"""


def _write_weights(folder, tensors, max_shard_size, total=None, progress=False):
    """Write `(key, tensor)` pairs into shards as they come (one shard and the tensor being made held)."""
    writer = ShardWriter(folder, max_shard_size, verify=False)
    with progress_bar(progress, total=total, desc="converting", unit="tensor") as bar:
        for key, tensor in tensors:
            writer.add(key, tensor)
            del tensor
            bar.update()
    return writer.close()


def _write(folder, original_config, tokenizer, converted_dir):
    (folder / CONFIG_FILE).write_text(json.dumps(original_config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(folder))
    for code in folder.glob("*_navil.py"):  # our tokenizer class copies itself; the original has its own code
        code.unlink()
    _for_original_code(folder / TOKENIZER_CONFIG_FILE)
    for name in TOKENIZER_FILES + LICENSE_FILES:  # e.g. a sentencepiece tokenizer.model carried from the original
        if (Path(converted_dir) / name).is_file() and not (folder / name).exists():
            shutil.copyfile(Path(converted_dir) / name, folder / name)
    (folder / "README.md").write_text(original_readme(converted_dir, original_config), encoding="utf-8")


# transformers 5 names for what the original code's transformers 4.x calls these tokenizer classes
TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast", "NaViLInternLM2Tokenizer": "InternLM2Tokenizer"}
# The original's own tokenizer code, which an original NaViL-2B folder names (its files come from OpenGVLab).
ORIGINAL_TOKENIZER_AUTO_MAP = {
    "NaViLInternLM2Tokenizer": {
        "AutoTokenizer": [
            "tokenization_internlm2.InternLM2Tokenizer",
            "tokenization_internlm2_fast.InternLM2TokenizerFast",
        ]
    }
}
LOAD_RECORD_KEYS = ("backend", "is_local", "local_files_only", "processor_class")


def _for_original_code(path):
    """Make the tokenizer_config.json transformers 5 wrote loadable by the original code's transformers 4.x:
    the 4.x tokenizer class name, `extra_special_tokens` (a list in 5.x, a dict of named tokens in 4.x)
    as `additional_special_tokens`, and no pointers to our processor code, which this folder lacks."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = TOKENIZER_CLASSES_4X.get(name, name)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config.setdefault("additional_special_tokens", extra)
    elif extra:
        config["extra_special_tokens"] = extra
    auto_map = {k: v for k, v in (config.pop("auto_map", None) or {}).items() if k != "AutoProcessor"}
    auto_map = ORIGINAL_TOKENIZER_AUTO_MAP.get(name, auto_map)
    if auto_map:
        config["auto_map"] = auto_map
    for key in LOAD_RECORD_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Verification


def check_original_layout(folder):
    """The written folder reads as an original checkpoint whose tensors are the ones its config implies."""
    try:
        config = load_original_config(folder)
        written = SafetensorsFolder.from_files(weight_files(folder), OriginalCheckpointError)
        check_original_state_dict(written.shapes(), config)
    except ConversionError as e:
        raise VerificationError(f"the written folder is not a valid original checkpoint: {e}") from None
    return f"{len(written)} tensors with the names and shapes the written config.json implies"


def compare_forward(original, ours, arch, text_config, progress=False):
    """Convert original-layout tensors forward again and compare with ours: every tensor bit for bit,
    except those of inexact (fold) rules, whose max-abs difference is returned. Returns
    `(number of exact tensors, max-abs error of the folded ones or None)`."""
    try:  # a lazy view: each tensor is converted when compared
        again = rule_view(original, plan_conversion(original.keys(), rules_for_config(arch, text_config)), text_config)
    except KeyMismatchError as e:
        raise VerificationError(f"the written weights do not convert forward again: {e}") from None
    inexact = [p for rule in rules_for_config(arch, text_config) if not rule.exact for p in rule.target_patterns]
    tied = bool(text_config.tie_word_embeddings)
    expected = set(ours.keys()) - ({"lm_head.weight"} if tied else set())
    missing, unexpected = sorted(expected - set(again.keys())), sorted(set(again.keys()) - set(ours.keys()))
    if missing or unexpected:
        raise VerificationError(
            "converting the written weights forward gives other keys: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    exact, error = 0, None
    with progress_bar(progress, total=len(expected), desc="verifying", unit="tensor") as bar:
        for key in sorted(expected):
            mine, back = ours[key], again[key]
            if any(p.fullmatch(key) for p in inexact):
                diff = (back.double() - mine.double()).abs().max().item() if back.shape == mine.shape else float("inf")
                error = diff if error is None else max(error, diff)
            elif not same_tensor(back, mine):
                raise VerificationError(f"converting the written weights forward does not give {key} bit for bit")
            else:
                exact += 1
            bar.update()
    if error is not None and not error < float("inf"):
        raise VerificationError("the approximate unfold gave non-finite or misshapen tensors")
    return exact, error


def check_forward(folder, ours, config, arch, progress=False):
    written = SafetensorsFolder.from_files(weight_files(folder), VerificationError)
    exact, error = compare_forward(written, ours, arch, config.text_config, progress)
    message = f"{exact} of our tensors reproduced bit for bit from the written original"
    if error is not None:
        message += f"; folded o_proj_ve refolded from the least-squares wo_ve: max-abs error {error:.3g}"
    return message, error


def comparable_config(config):
    """Our config as a dict without the keys that record how a folder was saved."""

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in SAVE_RECORD_KEYS}

    return strip(config.to_dict())


def check_config_forward(folder, config, folded):
    """`convert_config` of the written config.json (with the written tokenizer's ids) gives our config."""
    written_config = load_original_config(folder)
    again = convert_config(written_config, special_token_ids(load_tokenizer(folder)), fold_visual_output=folded)
    ours, theirs = comparable_config(config), comparable_config(again)
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise VerificationError(f"the written config.json does not convert back to this config (differs in {diff})")
    return "convert_config of the written config.json gives this config back"
