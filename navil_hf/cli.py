"""The `navil` command line (API.md "Command line").

    navil convert ORIGINAL_DIR OUT_DIR [--force] [--no-verify] [--dtype ...] [--fold-visual-output]
                  [--push-to-hub REPO_ID [--private] [--revision BRANCH]]
    navil convert --to-original OUT_DIR ORIGINAL_DIR [--force] [--approximate]
    navil chat [--model PATH_OR_REPO] [--image FILE ...] [--max-new-tokens N] [--device DEV] "question"
    navil init-from-llm LLM_DIR_OR_GGUF OUT_DIR [--vision-preset NAME] [--no-visual-experts] [--dtype ...]
                        [--chat-template ...]
    navil push OUT_DIR REPO_ID [--private] [--revision BRANCH] [--commit-message MSG]
    navil refresh FOLDER_OR_REPO --trust-remote-code [--out DIR [--force]] [--push [REPO_ID]]
                  [--revision BRANCH] [--commit-message MSG] [--dtype ...] [--device DEV]
    navil train CONFIG.yaml [--resume] [--force] [--set KEY=VALUE ...]
    navil params FOLDER_OR_CONFIG_JSON [--image WxH ...] [--text-tokens N] [--training] [--json]
    navil scaling fit RUNS.csv [--plot OUT.png] [--bootstrap N] [--holdout FRACTION] [--json]
    navil scaling joint RUNS.csv [--plot OUT.png] [--bootstrap N] [--json]

Mistakes in the input (a bad path, an existing output, a folder that is not an original checkpoint or
not ready to publish) end with one line on stderr and exit code 2; a failed verification or upload
with exit code 1.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ArgumentParser, UsageError, one_line

# `navil chat`: the default answer length, and the repetition guard (an answer stops once a span of up to
# GUARD_MAX_SPAN tokens has repeated GUARD_REPEATS times in a row).
DEFAULT_ANSWER_TOKENS = 512
GUARD_MAX_SPAN, GUARD_REPEATS = 16, 4


def build_parser():
    from . import DISTRIBUTION, __version__

    parser = ArgumentParser(prog="navil", description="NaViL checkpoints: convert, chat, publish.")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="on an internal error, show the Python traceback instead of one line"
    )
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
    convert.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="after a successful conversion, upload OUT_DIR to this Hub repo"
    )
    _add_push_options(convert, commit_message=False)
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    convert.set_defaults(handler=run_convert)

    chat = commands.add_parser(
        "chat",
        help="ask a converted NaViL model about images (streams the answer)",
        description="Load a converted NaViL folder or Hub repo and stream its answer to one question.",
    )
    chat.add_argument(
        "question",
        metavar="QUESTION",
        nargs="?",
        help="the question; `-` reads it from standard input; none starts an interactive multi-turn chat "
        "(an empty line or end of input ends it)",
    )
    chat.add_argument("--system", metavar="TEXT", default=None, help="a system message (default: the model's)")
    chat.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature; 0 (the default) is greedy decoding",
    )
    chat.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass (with --temperature)")
    chat.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    chat.add_argument(
        "--no-repetition-guard",
        action="store_true",
        help=f"do not stop an answer that loops (by default it stops once a span of up to "
        f"{GUARD_MAX_SPAN} tokens has repeated {GUARD_REPEATS} times in a row)",
    )
    chat.add_argument(
        "--model",
        metavar="PATH_OR_REPO",
        help="a NaViL folder or Hub repo id; without it, the demo model built from SmolLM2-135M-Instruct "
        "(needs the demo extra; its vision encoder is untrained)",
    )
    chat.add_argument(
        "--image", metavar="FILE", action="append", default=[], help="an image file; repeat for several images"
    )
    chat.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_ANSWER_TOKENS,
        help=f"answer length limit (default {DEFAULT_ANSWER_TOKENS})",
    )
    chat.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    chat.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: the checkpoint's)",
    )
    chat.set_defaults(handler=run_chat)

    init = commands.add_parser(
        "init-from-llm",
        help="start a NaViL checkpoint from a pretrained text LLM (Llama, Qwen2, Qwen3, InternLM2 or GGUF)",
        description="Build a Hub-ready NaViL folder from a pretrained LLM: text weights copied, every visual expert "
        "a copy of its text twin, NaViL's special tokens added, a fresh vision encoder and connector sized by "
        "--vision-preset, the LLM's chat template extended for images. Before writing, NaViL's logits on "
        "text-only prompts are checked against the LLM's (transformers, float32, max-abs <= 1e-4). "
        "--no-visual-experts builds no visual experts (every token through the text weights; with "
        "--vision-preset none: early fusion without experts).",
    )
    init.add_argument("llm", metavar="LLM_DIR_OR_GGUF", nargs="?", help="a Hugging Face LLM folder or a .gguf file")
    init.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="the folder to create")
    init.add_argument("--vision-preset", default=None, help="vision encoder size (see --list-presets; default base)")
    init.add_argument("--list-presets", action="store_true", help="print the vision presets and exit")
    init.add_argument(
        "--visual-experts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give every decoder layer visual experts, copies of the text weights (default); "
        "--no-visual-experts: none, every token goes through the text weights",
    )
    init.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (auto: the LLM's; float32 for GGUF)",
    )
    init.add_argument(
        "--chat-template",
        metavar="FILE_OR_NAME",
        default=None,
        help="a Jinja file or qwen3-chat/internlm2-chat, for LLMs without a chat template (default: the LLM's)",
    )
    init.add_argument(
        "--vision-layer-scale",
        type=float,
        default=None,
        metavar="X",
        help="starting LayerScale of the fresh encoder's blocks, in (0, 1] (default 0.1: blocks start close "
        "to the identity, which a fresh encoder learns from faster than 1.0)",
    )
    init.add_argument(
        "--token-order",
        choices=("window", "raster"),
        default="window",
        help="order of the visual tokens the LLM receives: window (the original's, default) or raster (the "
        "prompt's rows: for new models; not convertible to the original layout)",
    )
    init.add_argument("--min-dynamic-patch", type=_positive_int, default=256, help="fewest patches per image")
    init.add_argument("--max-dynamic-patch", type=_positive_int, default=24576, help="most patches per image")
    init.add_argument("--seed", type=int, default=0, help="seed of the fresh vision encoder and connector")
    init.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    init.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check text parity with the LLM and the reloaded folder before writing (default)",
    )
    init.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="largest safetensors shard, e.g. 500MB (default 5GB)"
    )
    init.add_argument("--trust-remote-code", action="store_true", help="allow the LLM folder's own code (InternLM2)")
    init.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    init.set_defaults(handler=run_init_from_llm)

    push = commands.add_parser(
        "push",
        help="check a converted folder and upload it to the Hub as one commit",
        description="Check that OUT_DIR is a complete NaViL folder that loads (code files, config with auto_map, "
        "safetensors matching the model, tokenizer, processor, chat template, generation config, model card), "
        "then upload it to the model repo REPO_ID as one commit, creating the repo if needed. The token comes "
        "from HF_TOKEN or your `hf auth login`.",
    )
    push.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by `navil convert`")
    push.add_argument("repo_id", metavar="REPO_ID", help="the model repo, OWNER/NAME")
    _add_push_options(push, commit_message=True)
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    push.set_defaults(handler=run_push)

    refresh = commands.add_parser(
        "refresh",
        help="give a converted NaViL folder or Hub repo this package's code files (weights untouched)",
        description="Replace the code files (*_navil.py) of a converted NaViL folder, or of a Hub repo, with this "
        "package's, keeping every other file byte for byte. First the folder's current code and the refreshed "
        "folder each run in a subprocess on a prompt with an image and a text-only prompt: same input ids, logits "
        "within 64 epsilons of --dtype x their magnitude, identical greedy tokens; otherwise nothing is written. "
        "A local folder is refreshed in place (or copied to --out); a Hub repo (OWNER/NAME) is downloaded, "
        "refreshed and pushed back as one commit that changes only code files.",
    )
    refresh.add_argument(
        "source", metavar="FOLDER_OR_REPO", help="a converted NaViL folder, or a Hub model repo OWNER/NAME"
    )
    refresh.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running the code the folder carries now (needed: it is compared with the new code)",
    )
    refresh.add_argument("--out", metavar="DIR", help="write the refreshed folder to DIR instead (a repo: not pushed)")
    refresh.add_argument("--force", action="store_true", help="with --out: replace DIR if it exists")
    refresh.add_argument(
        "--push",
        metavar="REPO_ID",
        nargs="?",
        const="",
        default=None,
        help="also publish the refreshed folder: a local one to REPO_ID; a Hub repo back to itself (the default "
        "without --out)",
    )
    _add_push_options(
        refresh,
        commit_message=True,
        private=False,
        revision_help="a Hub repo: the branch to refresh and push to (default main)",
    )
    refresh.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype both codes run the check in (default float32)",
    )
    refresh.add_argument("--device", default=None, help="torch device of the check (default: cuda if available)")
    refresh.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    refresh.set_defaults(handler=run_refresh)

    train = commands.add_parser(
        "train",
        help="train a NaViL on conversations (YAML config; transformers Trainer; packed, padding-free)",
        description="Fine-tune or pre-train a NaViL Hub folder on JSONL conversations (chat or LLaVA format) as the "
        "YAML config says (navil_hf.training.train documents every key). Writes OUTPUT_DIR/checkpoints (resumable) "
        "and OUTPUT_DIR/model, a Hub folder. Runs on several processes under torchrun / accelerate launch (DDP, "
        "FSDP2).",
    )
    train.add_argument("config", metavar="CONFIG", help="the training config (YAML)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    train.add_argument("--force", action="store_true", help="start over, deleting OUTPUT_DIR's earlier checkpoints")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set training.max_steps=10",
    )
    train.set_defaults(handler=run_train)

    from .commands import params, scaling

    for name, command in (("params", params), ("scaling", scaling)):
        sub = commands.add_parser(name, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def _add_push_options(
    parser, commit_message, private=True, revision_help="commit to this branch (created if missing; default main)"
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
        type=_positive_float,
        default=None,
        help="seconds to wait for each answer of the Hub (default: $NAVIL_PUSH_TIMEOUT, else 60)",
    )


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _positive_float(text):
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _probability(text):
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


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


# ---------------------------------------------------------------------------------------------------
# convert


def run_convert(args):
    from .conversion.convert import convert_checkpoint, print_checks

    if args.to_original:
        return run_convert_to_original(args)
    if args.approximate:
        raise UsageError("--approximate applies to --to-original only")
    if args.push_to_hub:
        from .conversion.push import check_push_target, resolve_timeout

        check_push_target(args.push_to_hub)  # before the conversion, which may take long
        resolve_timeout(args.timeout)
    elif args.private or args.revision or args.timeout:
        raise UsageError("--private, --revision and --timeout need --push-to-hub REPO_ID")
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
    print_checks(result)
    if args.push_to_hub:
        return _push(args, result.out_dir, args.push_to_hub)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# push


def run_push(args):
    return _push(args, args.out_dir, args.repo_id)


def _push(args, folder, repo_id):
    """Check and upload `folder`; an incomplete folder raises `ConversionError` (exit 2, nothing sent),
    a failed upload is reported here with exit code 1."""
    from .conversion.push import push_folder
    from .errors import PushError

    try:
        result = push_folder(
            folder,
            repo_id,
            private=getattr(args, "private", False),
            revision=args.revision,
            commit_message=getattr(args, "commit_message", None),
            progress=not args.quiet,
            timeout=args.timeout,
        )
    except PushError as e:
        retry = (
            f" ({folder} is written; retry with `navil push {folder} {repo_id}`)" if args.command == "convert" else ""
        )
        print(f"navil {args.command}: error: {e}{retry}", file=sys.stderr)
        return EXIT_FAILED
    return _report_push(args, result)


def _report_push(args, result):
    if result.warning:
        print(f"navil {args.command}: warning: {result.warning}", file=sys.stderr)
    where = f"{result.repo_id} (branch {result.revision})"
    if result.changed:
        deleted = f", removed stale {', '.join(result.deleted)}" if result.deleted else ""
        print(f"pushed {len(result.files)} files to {where}{deleted}: {result.commit_url}")
    else:
        print(f"nothing changed: {where} already holds these {len(result.files)} files ({result.commit_url})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# refresh


def refresh_source(text):
    """("folder", Path) for an existing folder, ("repo", id) for something shaped like OWNER/NAME."""
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.exists():
        raise UsageError(f"{text} is not a folder")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or not all(text.split("/")):
        raise UsageError(f"{text}: no such folder (and not a Hub repo id of the form OWNER/NAME)")
    return "repo", text


def run_refresh(args):
    from . import DISTRIBUTION, __version__
    from .conversion.refresh import refresh_folder, refresh_repo
    from .errors import PushError

    kind, source = refresh_source(args.source)
    if args.force and not args.out:
        raise UsageError("--force applies to --out DIR only")
    if kind == "folder":
        if args.push == "":
            raise UsageError(f"--push needs the REPO_ID to publish {source} to")
        if args.push is None and (args.revision or args.commit_message or args.timeout):
            raise UsageError("--revision, --commit-message and --timeout need --push REPO_ID for a local folder")
    elif args.push not in (None, "", source):
        raise UsageError(f"a Hub repo is pushed back to itself: --push {args.push} differs from {source}")
    report = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    options = dict(trust_remote_code=args.trust_remote_code, dtype=args.dtype, device=args.device, report=report)
    if kind == "folder":
        if args.push:
            from .conversion.push import check_push_target, resolve_timeout

            check_push_target(args.push)  # before the checks, which may take long
            resolve_timeout(args.timeout)
        result = refresh_folder(source, args.out, force=args.force, **options)
    else:
        push = args.push is not None or args.out is None
        try:
            result = refresh_repo(
                source,
                args.out,
                push=push,
                force=args.force,
                revision=args.revision,
                commit_message=args.commit_message,
                timeout=args.timeout,
                progress=not args.quiet,
                **options,
            )
        except PushError as e:
            print(f"navil refresh: error: {e}", file=sys.stderr)
            return EXIT_FAILED
    if not result.changed:
        print(f"{result.folder}: the code files are already those of {DISTRIBUTION} {__version__}; nothing written")
    else:
        for name, outcome in result.checks.items():
            print(f"  verified {name}: {outcome}")
        changes = [f"replaced {', '.join(result.replaced)}"] if result.replaced else []
        changes += [f"added {', '.join(result.added)}"] if result.added else []
        print(
            f"refreshed {result.folder}: {'; '.join(changes)}; {result.untouched} other files untouched "
            f"({result.seconds:.1f} s)"
        )
    if result.push is not None:
        return _report_push(args, result.push)
    if kind == "folder" and args.push:
        return _push(args, result.folder, args.push)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# init-from-llm


def run_init_from_llm(args):
    from .conversion.convert import print_checks
    from .conversion.init_llm import DEFAULT_PRESET, describe_presets, init_from_llm

    if args.list_presets:
        print(describe_presets())
        return EXIT_OK
    if not args.llm or not args.out_dir:
        raise UsageError("LLM_DIR_OR_GGUF and OUT_DIR are required")
    result = init_from_llm(
        args.llm,
        args.out_dir,
        vision_preset=args.vision_preset or DEFAULT_PRESET,
        dtype=args.dtype,
        force=args.force,
        verify=args.verify,
        progress=not args.quiet,
        seed=args.seed,
        chat_template=args.chat_template,
        min_dynamic_patch=args.min_dynamic_patch,
        max_dynamic_patch=args.max_dynamic_patch,
        trust_remote_code=args.trust_remote_code,
        max_shard_size=args.max_shard_size,
        visual_experts=args.visual_experts,
        **({} if args.vision_layer_scale is None else {"vision_layer_scale": args.vision_layer_scale}),
        token_order=args.token_order,
    )
    counts = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in result.parameters.items())
    dtype = str(result.dtype).replace("torch.", "")
    experts = "" if result.visual_experts else "; no visual experts"
    print(
        f"wrote {result.out_dir} (vision preset {result.vision_preset}{experts}; {counts}; {dtype}) "
        f"in {result.seconds:.1f} s"
    )
    print(f"  added tokens: {' '.join(result.added_tokens) or 'none (the tokenizer had them)'}")
    print_checks(result)
    return EXIT_OK


def run_convert_to_original(args):
    """`navil convert --to-original OUT_DIR ORIGINAL_DIR`: the positionals are read source first, as in
    the forward direction (here the converted folder, then the original-layout folder to create)."""
    from .conversion.back import convert_to_original
    from .conversion.convert import print_checks

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
    print_checks(result)
    if result.approximate:
        print(
            f"  approximate: wo_ve recovered by least squares from the folded o_proj_ve; max-abs error of the "
            f"refolded product {result.approximation_error:.3g}"
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# chat


def run_train(args):
    from .training.train import load_config, train

    if args.resume and args.force:
        raise UsageError("--resume continues a run and --force starts over: pass one of them")
    result = train(load_config(args.config, args.overrides), resume=args.resume, force=args.force)
    losses = {k: v for k, v in result.metrics.items() if k.endswith("loss")}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    print(f"trained model: {result.model_dir}" + (f" ({summary})" if summary else ""))
    return EXIT_OK


def check_model_reference(model):
    """A local folder must exist and hold config.json; anything else is taken as a Hub repo id."""
    from .folders import CONFIG_FILE

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise UsageError(f"{model} has no config.json: not a converted NaViL folder")
        try:
            model_type = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"{path / CONFIG_FILE} is not a JSON object: {e}") from None
        if model_type == "navil_chat":
            raise UsageError(
                f"{model} is an original NaViL checkpoint: convert it first (`navil convert {model} OUT_DIR`), "
                "then chat with --model OUT_DIR"
            )
        if model_type != "navil":
            raise UsageError(f"{model} holds a {model_type!r} model, not a converted NaViL folder (model_type navil)")
        return str(path)
    if path.exists():
        raise UsageError(f"{model} is not a folder")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"{model}: no such folder (and not a Hub repo id of the form OWNER/NAME)")
    return model


def run_chat(args):
    question = args.question
    if question == "-":
        question = sys.stdin.read().strip()
    if question is not None and not question.strip():
        raise UsageError("the question is empty")
    for image in args.image:
        if not Path(image).is_file():
            raise UsageError(f"image file not found: {image}")
    if args.model:
        model_ref = check_model_reference(args.model)
    else:
        from .demo import DEMO_NOTICE, ensure_demo_model

        model_ref = str(ensure_demo_model(progress=True))
        print(DEMO_NOTICE, file=sys.stderr)

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
    except (OSError, ValueError) as e:  # missing files, or a config that contradicts itself
        raise UsageError(f"cannot load {model_ref}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval()
    if device.type == "cpu" and model.dtype in (torch.float16,):
        model = model.float()  # float16 matmuls are slow or missing on CPU
    if args.seed is not None:
        torch.manual_seed(args.seed)

    session = _ChatSession(model, processor, args)
    if question is not None:
        session.answer(question, list(args.image))
        return EXIT_OK
    images = list(args.image)  # the interactive chat's images belong to its first turn
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return EXIT_OK
        session.answer(line.strip(), images)
        images = []


class _ChatSession:
    """One conversation: streams each answer, keeps the history, stops cleanly on Ctrl-C."""

    def __init__(self, model, processor, args):
        from transformers import StoppingCriteriaList

        self.model, self.processor, self.history = model, processor, []
        criteria = [] if args.no_repetition_guard else [_RepetitionGuard()]
        self.generate_kwargs = dict(stopping_criteria=StoppingCriteriaList(criteria))
        self.generation_config = {"max_new_tokens": args.max_new_tokens}
        if args.temperature > 0:
            self.generation_config.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        self.system = args.system

    def answer(self, question, images):
        import torch

        printed, stream = False, None
        try:
            with torch.inference_mode():
                stream = self.model.chat(
                    self.processor,
                    question,
                    images=images or None,
                    history=self.history,
                    return_history=True,
                    generation_config=self.generation_config,
                    system_message=self.system,
                    stream=True,
                    **self.generate_kwargs,
                )
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    printed = True
        except KeyboardInterrupt:
            # The stream has stopped its generation thread and joined it: leaving now exits cleanly (130).
            sys.stdout.write("\n")
            raise
        except (ValueError, OSError) as e:  # unreadable image, prompt too long for the context, ...
            if printed:
                sys.stdout.write("\n")
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        sys.stdout.write("\n")
        self.history = getattr(stream, "history", None) or self.history


class _RepetitionGuard:
    """Ends an answer that loops: once its last tokens are one span of 1..GUARD_MAX_SPAN tokens repeated
    GUARD_REPEATS times in a row. Greedy decoding is unchanged until then."""

    def __init__(self, max_span=GUARD_MAX_SPAN, repeats=GUARD_REPEATS):
        self.max_span, self.repeats = max_span, repeats

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(input_ids.tolist()):
            for span in range(1, self.max_span + 1):
                tail = ids[-span * self.repeats :]
                if len(tail) == span * self.repeats and tail == tail[:span] * self.repeats:
                    done[row] = True
                    break
        return done


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    """Entry point of the `navil` console script; returns the exit code."""
    from .errors import VerificationError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argument error already reported on one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    start = time.perf_counter()
    try:
        return args.handler(args)
    except UsageError as e:  # a ConversionError, DataError, RunsError, ... too
        print(f"navil {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as e:
        out = getattr(args, "out_dir", None)
        suffix = f"; nothing was written to {out}" if out else ""
        print(f"navil {args.command}: verification failed: {one_line(e)}{suffix}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"navil {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        print(
            f"navil {args.command}: internal error: {type(e).__name__}: {one_line(e)} "
            "(run `navil --debug ...` for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
