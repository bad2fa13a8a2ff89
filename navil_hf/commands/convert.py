"""`navil convert ORIGINAL_DIR OUT_DIR`: an original OpenGVLab NaViL checkpoint into a Hub-ready folder,
optionally published. The old spelling of the way back, `navil convert --to-original`, still runs
`navil to-original` after a deprecation line."""

import argparse
import sys

from ..errors import EXIT_OK, UsageError
from . import push, to_original
from .arguments import (
    add_dtype,
    add_force,
    add_max_shard_size,
    add_push_options,
    add_quiet,
    add_verify,
    writing_options,
)

HELP = "convert an original OpenGVLab NaViL checkpoint into a Hub-ready folder"
DESCRIPTION = (
    "Convert an original OpenGVLab NaViL checkpoint (config.json with model_type navil_chat + safetensors) into a "
    "folder that AutoModel/AutoProcessor load with trust_remote_code=True. The folder is built and verified beside "
    "the target and moved into place only if every check passes. (The way back is `navil to-original`.)"
)
OUTPUT = "out_dir"  # the folder it creates (a failed verification's report says nothing was written there)

DEPRECATION = "navil convert --to-original is deprecated; use navil to-original HF_DIR ORIGINAL_OUT (same options)"


def add_arguments(parser):
    parser.add_argument(
        "original_dir",
        metavar="ORIGINAL_DIR",
        help="the original checkpoint folder (with the deprecated --to-original: the converted folder)",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="the folder to create (with the deprecated --to-original: the original-layout folder)",
    )
    add_force(parser)
    add_verify(parser)
    add_dtype(parser, help="dtype of the written weights (auto: keep the checkpoint's)")
    add_max_shard_size(parser)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the original tokenizer's own Python code (some InternLM2 tokenizers need it)",
    )
    parser.add_argument(
        "--fold-visual-output",
        action="store_true",
        help="InternLM2: store the chained visual output projection wo_ve(wo(x)) folded into one o_proj_ve "
        "(inference only; such a folder cannot be converted back exactly)",
    )
    parser.add_argument(
        "--to-original",
        action="store_true",
        help="deprecated: use `navil to-original HF_DIR ORIGINAL_OUT`",
    )
    parser.add_argument(
        "--approximate", action="store_true", help="with the deprecated --to-original: see `navil to-original`"
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="after a successful conversion, upload OUT_DIR to this Hub repo"
    )
    add_push_options(parser, commit_message=False)
    add_quiet(parser)


def run(args):
    from ..conversion.convert import convert_checkpoint, print_checks

    if args.to_original:
        return _run_to_original(args)
    if args.approximate:
        raise UsageError("--approximate applies to --to-original only")
    if args.push_to_hub:
        from ..conversion.push import check_push_target, resolve_timeout

        check_push_target(args.push_to_hub)  # before the conversion, which may take long
        resolve_timeout(args.timeout)
    elif args.private or args.revision or args.timeout:
        raise UsageError("--private, --revision and --timeout need --push-to-hub REPO_ID")
    result = convert_checkpoint(
        args.original_dir,
        args.out_dir,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        fold_visual_output=args.fold_visual_output,
        **writing_options(args),
    )
    dtype = str(result.dtype).replace("torch.", "")
    print(
        f"wrote {result.out_dir} ({result.num_written_tensors} tensors from {result.num_original_tensors} original, "
        f"{dtype}) in {result.seconds:.1f} s"
    )
    print_checks(result)
    if args.push_to_hub:
        return push.publish(args, result.out_dir, args.push_to_hub)
    return EXIT_OK


def _run_to_original(args):
    """The deprecated `navil convert --to-original HF_DIR ORIGINAL_OUT`: `navil to-original` with the same
    positionals, after refusing the options that apply to the forward direction only."""
    print(DEPRECATION, file=sys.stderr)
    unsupported = [
        flag
        for flag, given in (
            ("--fold-visual-output", args.fold_visual_output),
            ("--push-to-hub", args.push_to_hub),
            ("--private", args.private),
            ("--revision", args.revision),
            ("--dtype", args.dtype != "auto"),
            ("--trust-remote-code", args.trust_remote_code),
        )
        if given
    ]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} cannot be combined with --to-original")
    return to_original.run(
        argparse.Namespace(
            hf_dir=args.original_dir,
            original_out=args.out_dir,
            force=args.force,
            verify=args.verify,
            approximate=args.approximate,
            max_shard_size=args.max_shard_size,
            quiet=args.quiet,
        )
    )
