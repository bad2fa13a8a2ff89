"""Stand-ins for the modules transformers' sdist `tests/` imports but does not ship (README.md)."""
