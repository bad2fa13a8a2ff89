"""The `navil` command line (API.md "Command line").

    navil convert ORIGINAL_DIR OUT_DIR [--force] [--no-verify] [--dtype ...] [--fold-visual-output]
                  [--push-to-hub REPO_ID [--private] [--revision BRANCH]]
    navil to-original HF_DIR ORIGINAL_OUT [--force] [--no-verify] [--approximate] [--max-shard-size SIZE]
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

Each command is a module in `navil_hf.commands`; this module builds the parser from them and reports their
errors. Mistakes in the input (a bad path, an existing output, a folder that is not an original checkpoint
or not ready to publish) end with one line on stderr and exit code 2; a failed verification or upload with
exit code 1; Ctrl-C with 130.
"""

import sys
import time

from .commands import chat, convert, init_from_llm, params, push, refresh, scaling, to_original, train
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ArgumentParser, UsageError, VerificationError, one_line

# The commands in the order `navil --help` lists them.
COMMANDS = (convert, to_original, chat, init_from_llm, push, refresh, train, params, scaling)


def command_name(module):
    """`navil_hf.commands.init_from_llm` -> `init-from-llm`."""
    return module.__name__.rpartition(".")[2].replace("_", "-")


def build_parser():
    from . import DISTRIBUTION, __version__

    parser = ArgumentParser(prog="navil", description="NaViL checkpoints: convert, chat, publish.")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="on an internal error, show the Python traceback instead of one line"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        command = commands.add_parser(command_name(module), help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    """Entry point of the `navil` console script; returns the exit code."""
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
        out = getattr(args, _output_argument(args.command), None)
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


def _output_argument(command):
    """The argument that names the folder `command` creates (its module's OUTPUT), or ""."""
    modules = {command_name(module): module for module in COMMANDS}
    return getattr(modules.get(command), "OUTPUT", "")


if __name__ == "__main__":
    sys.exit(main())
