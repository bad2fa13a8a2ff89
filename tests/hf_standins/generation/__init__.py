"""Stand-in package for transformers' `tests/generation/` (not in the sdist)."""
