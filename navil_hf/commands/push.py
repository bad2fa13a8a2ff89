"""`navil push OUT_DIR REPO_ID`: check a converted folder and upload it to the Hub as one commit; also the
upload and its report for `navil convert --push-to-hub` and `navil refresh --push`."""

import sys

from ..errors import EXIT_FAILED, EXIT_OK
from .arguments import add_push_options, add_quiet

HELP = "check a converted folder and upload it to the Hub as one commit"
DESCRIPTION = (
    "Check that OUT_DIR is a complete NaViL folder that loads (code files, config with auto_map, safetensors "
    "matching the model, tokenizer, processor, chat template, generation config, model card), then upload it to the "
    "model repo REPO_ID as one commit, creating the repo if needed. The token comes from HF_TOKEN or your "
    "`hf auth login`."
)


def add_arguments(parser):
    parser.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by `navil convert`")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the model repo, OWNER/NAME")
    add_push_options(parser, commit_message=True)
    add_quiet(parser)


def run(args):
    return publish(args, args.out_dir, args.repo_id)


def publish(args, folder, repo_id):
    """Check and upload `folder` with the command's push options; an incomplete folder raises
    `ConversionError` (exit 2, nothing sent), a failed upload is reported here with exit code 1."""
    from ..conversion.push import push_folder
    from ..errors import PushError

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
    return report(args, result)


def report(args, result):
    """Print what a push did (a warning first, on stderr)."""
    if result.warning:
        print(f"navil {args.command}: warning: {result.warning}", file=sys.stderr)
    where = f"{result.repo_id} (branch {result.revision})"
    if result.changed:
        deleted = f", removed stale {', '.join(result.deleted)}" if result.deleted else ""
        print(f"pushed {len(result.files)} files to {where}{deleted}: {result.commit_url}")
    else:
        print(f"nothing changed: {where} already holds these {len(result.files)} files ({result.commit_url})")
    return EXIT_OK
