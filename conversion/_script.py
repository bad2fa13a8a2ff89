"""What the scripts in this folder share: run a `navil` subcommand from a plain checkout (the repository
root on `sys.path`, so `navil_hf` and the Hub files import without `pip install`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(*command):
    """Run `navil COMMAND... ARGS` with this script's arguments; exits with the command's exit code."""
    from navil_hf.cli import main

    sys.exit(main([*command, *sys.argv[1:]]))
