"""`navil convert`: an original OpenGVLab NaViL checkpoint (SPEC §7) -> a Hub-ready folder (API.md).

Steps: read the original config and the safetensors headers; check the tensor names and shapes against
what the config implies, and plan which rule (`keymap.py`, `surgery.py`) makes each of our tensors --
all before any tensor is read. Then stream: each rule's tensors are read, converted, cast and added to
the output shard being filled, so memory holds one shard (`--max-shard-size`) and one layer, whatever
the checkpoint's size. The folder is written into a temporary directory beside the output, verified,
and only then published under the output's name (atomically). On any failure nothing is written.

InternLM2's visual tokens get the chained output projection `wo_ve(wo(x))` (SPEC §8.2). By default it is
kept chained (`text_config.chain_visual_output=True`, `wo_ve` renamed to a hidden->hidden `o_proj_ve`), so
the conversion is exact both ways and `navil to-original` (`back.py`) reproduces the original
bit for bit. `--fold-visual-output` (inference-only deployments) stores one `o_proj_ve = W_ve @ W` instead
(float64 product; one matmul less per visual token); a folded folder cannot be converted back exactly.

Verification (`--verify`, the default), every step streamed:

1. every original tensor is consumed by the key map (checked on the names, before reading);
2. converting the *written* weights back to the original layout reproduces every original tensor bit
   for bit (in the output dtype); with `--fold-visual-output` the InternLM2 folded `o_proj_ve` has no
   exact inverse, so there the fold of the original `wo_ve`, `wo` must equal the written tensor bit for bit;
3. each written shard, read back, holds exactly the converted tensors (bitwise), and the written names
   and shapes are the model's;
4. the written tokenizer loads without any code of its own and encodes a probe text like the original;
5. the folder, loaded through `AutoModel`/`AutoProcessor.from_pretrained(..., trust_remote_code=True)`
   with no missing or unexpected weights and every weight left on disk (accelerate's offload), gives
   the same logits as our model fed module by module from the original checkpoint, on a short chat
   prompt with one small image.
"""

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConversionError
from ..folders import (
    CONFIG_FILE,
    LICENSE_FILES,
    TOKENIZER_FILES,
    SafetensorsFolder,
    check_output_dir,
    progress_bar,
    staged_folder,
    transformers_progress_bars,
)
from ..hub import build_generation_config, build_processor, model_card, read_license, write_hub_folder, write_weights
from .keymap import cast_view, plan_conversion, rule_view, rules_for_config
from .original import (
    OriginalCheckpointError,
    check_original_state_dict,
    convert_config,
    embedding_key,
    llm_architecture,
    lm_head_key,
    load_original_config,
    special_token_ids,
    weight_files,
)
from .schema import check_token_ids
from .surgery import checkpoint_dtype_of_headers, resolve_dtype
from .tokenizer import load_tokenizer
from .verify import check_offloaded_logits, verify_streamed


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
    notices: list = field(default_factory=list)  # things left out of the folder on purpose (foreign code)


def print_checks(result, file=None):
    """One line per verification check of a conversion result (or that it was not verified), after
    one per notice (what was left out of the folder on purpose)."""
    for notice in getattr(result, "notices", ()):
        print(f"  notice: {notice}", file=file)
    for name, outcome in result.checks.items():
        print(f"  verified {name}: {outcome}", file=file)
    if not result.verified:
        print("  not verified (--no-verify)", file=file)


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
    out_dir = check_output_dir(out_dir, force, sources=(original_dir,))
    original_config = load_original_config(original_dir)
    arch = llm_architecture(original_config)
    files = weight_files(original_dir)
    tokenizer = load_tokenizer(original_dir, trust_remote_code)
    token_ids = special_token_ids(tokenizer)
    check_token_ids(token_ids, original_config["llm_config"]["vocab_size"], original_dir / CONFIG_FILE)
    config = convert_config(original_config, token_ids, fold_visual_output=fold_visual_output)

    original = SafetensorsFolder.from_files(files, OriginalCheckpointError, check_finite=True)
    check_original_state_dict(original.shapes(), original_config)  # names and shapes, from the headers
    plan = plan_conversion(original.keys(), rules_for_config(arch, config.text_config))
    _check_tied_head(original, original_config, config)
    target = resolve_dtype(dtype, checkpoint_dtype_of_headers(original))
    config.dtype = target

    try:
        processor = build_processor(tokenizer, config)
    except ValueError as e:  # e.g. a tokenizer that splits <IMG_CONTEXT>
        raise ConversionError(f"cannot build the processor from the original tokenizer: {e}") from None
    extra = [original_dir / name for name in TOKENIZER_FILES + LICENSE_FILES if (original_dir / name).is_file()]
    card = model_card(
        config, source=_source_name(original_dir), license=read_license(original_dir), dtype=target, verified=verify
    )
    converted = cast_view(rule_view(original, plan, config.text_config), target)
    if config.tie_word_embeddings:  # ours shares the embedding (not written; the offload hooks look it up)
        converted.add(LM_HEAD, functools.partial(converted.__getitem__, EMBEDDINGS))
    checks, notices = {}, []
    with staged_folder(out_dir, force) as tmp:
        # The weights, streamed: one rule's tensors read, converted and cast at a time, one shard held.
        num_written = write_weights(tmp, converted, config, target, max_shard_size, verify, progress)
        original.check_finite = False  # every tensor was checked as it was converted
        steps = len(extra) + 7  # + config, processor, 4 code files, README.md
        with progress_bar(progress, total=steps, desc="writing", unit="file") as bar:
            write_hub_folder(
                None,
                config,
                tokenizer,
                tmp,
                processor=processor,
                generation_config=build_generation_config(tokenizer),
                model_card=card,
                extra_files=extra,
                progress=lambda description: bar.update(),
                notices=notices,
            )
        if verify:
            checks = verify_streamed(tmp, original, original_config, config, tokenizer, target, progress)
            checks["written = converted"] = f"{num_written} written tensors equal the converted ones bit for bit"
            checks["logits"] = check_offloaded_logits(tmp, converted, config, target, attn_implementation)
        if _before_publish is not None:  # test hook: simulate a failure between verification and publishing
            _before_publish(tmp)
    return ConversionResult(
        out_dir=out_dir,
        config=config,
        dtype=target,
        num_original_tensors=len(original),
        num_written_tensors=num_written,
        verified=verify,
        checks=checks,
        seconds=time.perf_counter() - start,
        notices=notices,
    )


LM_HEAD, EMBEDDINGS = "lm_head.weight", "model.language_model.embed_tokens.weight"


GENERIC_FOLDER_NAMES = ("checkpoint", "checkpoints", "model", "weights", "hf", "original")


def _source_name(original_dir):
    """A short name for the model card: the folder's name (with its parent's when the name is generic)."""
    path = Path(original_dir).resolve()
    if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _check_tied_head(original, original_config, config):
    """A tied checkpoint may omit its LM head: ours then shares the embedding. If it has one, it must
    equal the embedding."""
    if not config.tie_word_embeddings:
        return
    head, embed = lm_head_key(original_config), embedding_key(original_config)
    if head in original and not torch.equal(original[head], original[embed]):
        raise ConversionError(f"llm_config.tie_word_embeddings is true but {head} differs from {embed}; fix the config")
