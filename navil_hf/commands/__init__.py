"""The `navil` subcommands, one module each (`navil_hf/commands/<name>.py`), each with

    HELP         one line for `navil --help`
    DESCRIPTION  the paragraph of `navil <name> --help`
    add_arguments(parser)  its options (shared ones through the `add_*` functions of `arguments.py`)
    run(args) -> int       the exit code; a user mistake raises `navil_hf.errors.UsageError` (exit 2)
    OUTPUT       (optional) the argument naming the folder the command creates: a failed verification's
                 report says nothing was written there

The command's name is the module's, with dashes (`init_from_llm.py` is `navil init-from-llm`). Modules
import torch and the libraries inside `run`, so `navil --help` starts fast.

`navil_hf.cli` builds the `navil` parser from them and reports errors (`navil_hf.errors`). A new command
is a new module here plus its entry in `navil_hf.cli.COMMANDS`.
"""
