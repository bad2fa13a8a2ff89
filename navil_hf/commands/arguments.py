"""Argument types and options that several `navil` commands share: each check is one argparse `type=`
that rejects bad input with one line (exit code 2)."""

import argparse
import math
import re


def _number(text, kind, accept, expected):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_float(text):
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number >= 0")


def positive_float(text):
    return _number(text, float, lambda v: 0 < v < math.inf, "a number > 0")


def probability(text):
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def fraction(text):
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def positive_int(text):
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text):
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def shard_size(text):
    """A safetensors shard size: bytes, or a number with KB/MB/GB (KiB/MiB/GiB)."""
    text = text.strip()
    if not re.fullmatch(r"\d+(?:[KMG]i?B)?", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 5GB, got {text!r}")
    return int(text) if text.isdigit() else text.upper()


# The options several commands declare: each `add_*` puts one on a command's parser, with that command's help.

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_force(parser, help="replace OUT_DIR if it exists"):
    parser.add_argument("--force", action="store_true", help=help)


def add_verify(parser, help="check the result before writing it (default; --no-verify skips the checks)"):
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help=help)


def add_max_shard_size(parser):
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 500MB (default 5GB)",
    )


def add_quiet(parser, help="no progress bars"):
    parser.add_argument("-q", "--quiet", action="store_true", help=help)


def writing_options(args):
    """The keyword arguments that `add_force`, `add_verify`, `add_max_shard_size` and `add_quiet` give a
    command that writes a folder (`convert_checkpoint`, `convert_to_original`, `init_from_llm`)."""
    return dict(force=args.force, verify=args.verify, progress=not args.quiet, max_shard_size=args.max_shard_size)


def add_dtype(parser, help, choices=DTYPES, default="auto"):
    parser.add_argument("--dtype", choices=choices, default=default, help=help)


def add_push_options(
    parser, commit_message=True, private=True, revision_help="commit to this branch (created if missing; default main)"
):
    """The Hub options of the commands that push: --private, --revision, --commit-message, --timeout."""
    if private:
        parser.add_argument(
            "--private",
            action="store_true",
            help="create the repo private (an existing repo keeps its visibility; an existing public one is refused)",
        )
    parser.add_argument("--revision", metavar="BRANCH", help=revision_help)
    if commit_message:
        parser.add_argument("--commit-message", metavar="MSG", help="summary of the commit")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help="seconds to wait for each answer of the Hub (default: $NAVIL_PUSH_TIMEOUT, else 60)",
    )
