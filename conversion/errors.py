"""Errors the command line reports as one line (exit code 2 for bad input, 1 for a failed check)."""


class ConversionError(ValueError):
    """Bad input: a folder that is not an original checkpoint, an existing output, a bad option."""


class VerificationError(RuntimeError):
    """The converted checkpoint failed a check; nothing was written."""


class PushError(RuntimeError):
    """Publishing to the Hub failed (the Hub refused or the upload broke off); no commit was made."""


def first_line(error):
    """The first line of an exception's message (its type's name when it has none): what a one-line
    error report shows of an error from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
