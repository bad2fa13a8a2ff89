"""The errors every `navil` command reports as one line, and their exit codes.

A mistake in the input (a bad path, an existing output, a folder that is not a checkpoint, a bad option, a
malformed data file or runs table) is a `UsageError`: one line on stderr, exit code 2. A check that failed
(`VerificationError`) or an upload that broke off (`PushError`) exits with 1; Ctrl-C with 130. Nothing here
imports torch or transformers, so the command line starts fast.
"""

import argparse

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class ConversionError(UsageError):
    """Bad input to a conversion: a folder that is not an original checkpoint, an existing output, a bad option."""


class VerificationError(RuntimeError):
    """A written checkpoint failed a check; nothing was written (exit code 1)."""


class PushError(RuntimeError):
    """Publishing to the Hub failed (the Hub refused or the upload broke off); no commit was made (exit code 1)."""


def first_line(error):
    """The first line of an exception's message (its type's name when it has none): what a one-line error
    report shows of an error from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error):
    """An error message on one line (messages from libraries may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit code 2) instead of the usage block and the error."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
