"""Stand-in package for transformers' `tests/exporters/` (not in the sdist)."""
