"""`navil refresh FOLDER_OR_REPO`: give a converted folder or Hub repo this package's code files, after
checking that the new code behaves as the old one (`navil_hf.conversion.refresh`)."""

import sys
from pathlib import Path

from ..errors import EXIT_FAILED, EXIT_OK, UsageError
from . import push
from .arguments import add_dtype, add_force, add_push_options, add_quiet

HELP = "give a converted NaViL folder or Hub repo this package's code files (weights untouched)"
DESCRIPTION = (
    "Replace the code files (*_navil.py) of a converted NaViL folder, or of a Hub repo, with this package's, keeping "
    "every other file byte for byte. First the folder's current code and the refreshed folder each run in a "
    "subprocess on a prompt with an image and a text-only prompt: same input ids, logits within 64 epsilons of "
    "--dtype x their magnitude, identical greedy tokens; otherwise nothing is written. A local folder is refreshed "
    "in place (or copied to --out); a Hub repo (OWNER/NAME) is downloaded, refreshed and pushed back as one commit "
    "that changes only code files."
)


def add_arguments(parser):
    parser.add_argument(
        "source", metavar="FOLDER_OR_REPO", help="a converted NaViL folder, or a Hub model repo OWNER/NAME"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running the code the folder carries now (needed: it is compared with the new code)",
    )
    parser.add_argument("--out", metavar="DIR", help="write the refreshed folder to DIR instead (a repo: not pushed)")
    add_force(parser, help="with --out: replace DIR if it exists")
    parser.add_argument(
        "--push",
        metavar="REPO_ID",
        nargs="?",
        const="",
        default=None,
        help="also publish the refreshed folder: a local one to REPO_ID; a Hub repo back to itself (the default "
        "without --out)",
    )
    add_push_options(
        parser,
        commit_message=True,
        private=False,
        revision_help="a Hub repo: the branch to refresh and push to (default main)",
    )
    add_dtype(
        parser,
        help="dtype both codes run the check in (default float32)",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
    )
    parser.add_argument("--device", default=None, help="torch device of the check (default: cuda if available)")
    add_quiet(parser, help="no progress output")


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


def run(args):
    from .. import DISTRIBUTION, __version__
    from ..conversion.refresh import refresh_folder, refresh_repo
    from ..errors import PushError

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
            from ..conversion.push import check_push_target, resolve_timeout

            check_push_target(args.push)  # before the checks, which may take long
            resolve_timeout(args.timeout)
        result = refresh_folder(source, args.out, force=args.force, **options)
    else:
        try:
            result = refresh_repo(
                source,
                args.out,
                push=args.push is not None or args.out is None,
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
        return push.report(args, result.push)
    if kind == "folder" and args.push:
        return push.publish(args, result.folder, args.push)
    return EXIT_OK
