"""Errors the command line reports as one line (exit code 2 for bad input, 1 for a failed check)."""


class ConversionError(ValueError):
    """Bad input: a folder that is not an original checkpoint, an existing output, a bad option."""


class VerificationError(RuntimeError):
    """The converted checkpoint failed a check; nothing was written."""
