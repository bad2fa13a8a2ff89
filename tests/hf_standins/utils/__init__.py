"""Stand-in package for transformers' `tests/utils/` (not in the sdist)."""
