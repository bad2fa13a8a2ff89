"""The `navil` command line (API.md "Command line").

    navil convert ORIGINAL_DIR OUT_DIR [--force] [--no-verify] [--dtype ...] [--fold-visual-output]
                  [--push-to-hub REPO_ID]
    navil convert --to-original OUT_DIR ORIGINAL_DIR [--force] [--approximate]
    navil chat --model PATH_OR_REPO [--image FILE ...] [--max-new-tokens N] [--device DEV] "question"
    navil init-from-llm ...   (not implemented yet)
    navil push ...            (not implemented yet)

Mistakes in the input (a bad path, an existing output, a folder that is not an original checkpoint)
end with one line on stderr and exit code 2; a failed verification with exit code 1.
"""

import argparse
import re
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NOT_IMPLEMENTED_ISSUE = "issue #3"


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser():
    parser = _Parser(prog="navil", description="NaViL checkpoints: convert, chat, publish.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert an original OpenGVLab NaViL checkpoint into a Hub-ready folder",
        description="Convert an original OpenGVLab NaViL checkpoint (config.json with model_type navil_chat + "
        "safetensors) into a folder that AutoModel/AutoProcessor load with trust_remote_code=True, or with "
        "--to-original a converted folder back into the original layout. The folder is built and verified beside "
        "the target and moved into place only if every check passes.",
    )
    convert.add_argument(
        "original_dir",
        metavar="ORIGINAL_DIR",
        help="the original checkpoint folder (with --to-original: the converted folder, OUT_DIR)",
    )
    convert.add_argument(
        "out_dir", metavar="OUT_DIR", help="the folder to create (with --to-original: the original-layout ORIGINAL_DIR)"
    )
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    convert.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the result before writing it (default; --no-verify skips the checks)",
    )
    convert.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (auto: keep the checkpoint's)",
    )
    convert.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="largest safetensors shard, e.g. 500MB (default 5GB)"
    )
    convert.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the original tokenizer's own Python code (some InternLM2 tokenizers need it)",
    )
    convert.add_argument(
        "--fold-visual-output",
        action="store_true",
        help="InternLM2: store the chained visual output projection wo_ve(wo(x)) folded into one o_proj_ve "
        "(inference only; such a folder cannot be converted back exactly)",
    )
    convert.add_argument(
        "--to-original",
        action="store_true",
        help="convert a converted folder (OUT_DIR) back into the original OpenGVLab layout (ORIGINAL_DIR)",
    )
    convert.add_argument(
        "--approximate",
        action="store_true",
        help="with --to-original: accept a --fold-visual-output folder and recover wo_ve by least squares "
        "(reports the error)",
    )
    convert.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to the Hub (not implemented yet)")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    convert.set_defaults(handler=run_convert)

    chat = commands.add_parser(
        "chat",
        help="ask a converted NaViL model about images (streams the answer)",
        description="Load a converted NaViL folder or Hub repo and stream its answer to one question.",
    )
    chat.add_argument("question", metavar="QUESTION", help="the question")
    chat.add_argument("--model", metavar="PATH_OR_REPO", help="converted folder or Hub repo id (required for now)")
    chat.add_argument(
        "--image", metavar="FILE", action="append", default=[], help="an image file; repeat for several images"
    )
    chat.add_argument("--max-new-tokens", type=_positive_int, default=None, help="answer length limit")
    chat.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    chat.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: the checkpoint's)",
    )
    chat.set_defaults(handler=run_chat)

    init = commands.add_parser("init-from-llm", help="start a NaViL checkpoint from a text LLM (not implemented yet)")
    init.add_argument("llm", metavar="LLM_DIR_OR_GGUF")
    init.add_argument("out_dir", metavar="OUT_DIR")
    init.add_argument("--vision-preset", default=None)
    init.set_defaults(handler=_not_implemented("navil init-from-llm"))

    push = commands.add_parser("push", help="upload a converted folder to the Hub (not implemented yet)")
    push.add_argument("out_dir", metavar="OUT_DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.set_defaults(handler=_not_implemented("navil push"))
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shard_size(text):
    text = text.strip()
    if not re.fullmatch(r"\d+(?:[KMG]i?B)?", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 5GB, got {text!r}")
    return int(text) if text.isdigit() else text.upper()


def _not_implemented(name):
    def handler(args):
        raise UsageError(f"{name} is not implemented yet ({NOT_IMPLEMENTED_ISSUE})")

    return handler


# ---------------------------------------------------------------------------------------------------
# convert


def run_convert(args):
    from .convert import convert_checkpoint

    if args.to_original:
        return run_convert_to_original(args)
    if args.approximate:
        raise UsageError("--approximate applies to --to-original only")
    if args.push_to_hub:
        raise UsageError(
            f"--push-to-hub is not implemented yet ({NOT_IMPLEMENTED_ISSUE}); convert without it and upload "
            "OUT_DIR yourself (e.g. `hf upload REPO_ID OUT_DIR`)"
        )
    result = convert_checkpoint(
        args.original_dir,
        args.out_dir,
        dtype=args.dtype,
        force=args.force,
        verify=args.verify,
        progress=not args.quiet,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
        fold_visual_output=args.fold_visual_output,
    )
    dtype = str(result.dtype).replace("torch.", "")
    print(
        f"wrote {result.out_dir} ({result.num_written_tensors} tensors from {result.num_original_tensors} original, "
        f"{dtype}) in {result.seconds:.1f} s"
    )
    for name, outcome in result.checks.items():
        print(f"  verified {name}: {outcome}")
    if not result.verified:
        print("  not verified (--no-verify)")
    return EXIT_OK


def run_convert_to_original(args):
    """`navil convert --to-original OUT_DIR ORIGINAL_DIR`: the positionals are read source first, as in
    the forward direction (here the converted folder, then the original-layout folder to create)."""
    from .back import convert_to_original

    unsupported = [
        flag
        for flag, given in (
            ("--fold-visual-output", args.fold_visual_output),
            ("--push-to-hub", args.push_to_hub),
            ("--dtype", args.dtype != "auto"),
            ("--trust-remote-code", args.trust_remote_code),
        )
        if given
    ]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} cannot be combined with --to-original")
    result = convert_to_original(
        args.original_dir,
        args.out_dir,
        force=args.force,
        verify=args.verify,
        progress=not args.quiet,
        approximate=args.approximate,
        max_shard_size=args.max_shard_size,
    )
    dtype = str(result.dtype).replace("torch.", "")
    print(
        f"wrote {result.original_dir} in the original layout ({result.num_written_tensors} tensors from "
        f"{result.num_tensors}, {dtype}) in {result.seconds:.1f} s"
    )
    for name, outcome in result.checks.items():
        print(f"  verified {name}: {outcome}")
    if result.approximate:
        print(
            f"  approximate: wo_ve recovered by least squares from the folded o_proj_ve; max-abs error of the "
            f"refolded product {result.approximation_error:.3g}"
        )
    if not result.verified:
        print("  not verified (--no-verify)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# chat


def check_model_reference(model):
    """A local folder must exist and hold config.json; anything else is taken as a Hub repo id."""
    if not model:
        raise UsageError(
            "--model is required (a converted folder or Hub repo id); "
            "make one with `navil convert ORIGINAL_DIR OUT_DIR`"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model} has no config.json: not a converted NaViL folder")
        return str(path)
    if path.exists():
        raise UsageError(f"{model} is not a folder")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"{model}: no such folder (and not a Hub repo id of the form OWNER/NAME)")
    return model


def run_chat(args):
    model_ref = check_model_reference(args.model)
    for image in args.image:
        if not Path(image).is_file():
            raise UsageError(f"image file not found: {image}")
    if not args.question.strip():
        raise UsageError("the question is empty")

    import torch
    from transformers import AutoModel, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal for the answer
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # unknown device string, or a backend this torch lacks
        raise UsageError(f"cannot use --device {args.device!r}: {str(e).splitlines()[0]}") from None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = AutoModel.from_pretrained(model_ref, trust_remote_code=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_ref, trust_remote_code=True)
    except OSError as e:
        raise UsageError(f"cannot load {model_ref}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval()
    if device.type == "cpu" and model.dtype in (torch.float16,):
        model = model.float()  # float16 matmuls are slow or missing on CPU

    generation_config = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    printed = False
    try:
        with torch.inference_mode():
            for piece in model.chat(
                processor,
                args.question,
                images=list(args.image) or None,
                generation_config=generation_config,
                stream=True,
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
                printed = True
    except (ValueError, OSError) as e:  # unreadable image, prompt too long for the context, ...
        if printed:
            sys.stdout.write("\n")
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    sys.stdout.write("\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    """Entry point of the `navil` console script; returns the exit code."""
    from .errors import ConversionError, VerificationError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argument error already reported on one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    start = time.perf_counter()
    try:
        return args.handler(args)
    except (UsageError, ConversionError) as e:
        print(f"navil {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as e:
        out = getattr(args, "out_dir", None)
        suffix = f"; nothing was written to {out}" if out else ""
        print(f"navil {args.command}: verification failed: {e}{suffix}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"navil {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
