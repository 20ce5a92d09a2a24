"""Model ports the project computes itself, one folder per model (transformers-style)."""
