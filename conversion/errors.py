"""Errors the command line reports as one line (exit code 2 for bad input, 1 for a failed check)."""


class ConversionError(ValueError):
    """Bad input: a folder that is not an original checkpoint, an existing output, a bad option."""


class VerificationError(RuntimeError):
    """The converted checkpoint failed a check; nothing was written."""


class PushError(RuntimeError):
    """Publishing to the Hub failed (the Hub refused or the upload broke off); no commit was made."""
