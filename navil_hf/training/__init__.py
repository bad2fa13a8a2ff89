"""Training NaViL-style models."""
