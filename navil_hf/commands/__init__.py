"""The `navil` subcommands, one module each (`navil_hf/commands/<name>.py`), each with

    HELP         one line for `navil --help`
    DESCRIPTION  the paragraph of `navil <name> --help`
    add_arguments(parser)  its options (shared ones come from the parent parsers in `arguments.py`)
    run(args) -> int       the exit code; a user mistake raises `navil_hf.errors.UsageError` (exit 2)

`navil_hf.cli` builds the `navil` parser from them and reports errors (`navil_hf.errors`). A new command
is a new module here plus one line in `navil_hf.cli.COMMANDS`.
"""
