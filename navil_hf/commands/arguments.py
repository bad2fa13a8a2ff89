"""Argument types and options that several `navil` commands share: each check is one argparse `type=`
that rejects bad input with one line (exit code 2)."""

import argparse
import math
import re


def _number(text, kind, accept, expected):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def non_negative_float(text):
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number >= 0")


def positive_float(text):
    return _number(text, float, lambda v: 0 < v < math.inf, "a number > 0")


def probability(text):
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def fraction(text):
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def positive_int(text):
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text):
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def shard_size(text):
    """A safetensors shard size: bytes, or a number with KB/MB/GB (KiB/MiB/GiB)."""
    text = text.strip()
    if not re.fullmatch(r"\d+(?:[KMG]i?B)?", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 5GB, got {text!r}")
    return int(text) if text.isdigit() else text.upper()
