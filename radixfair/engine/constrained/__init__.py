"""Structured outputs: grammar-constrained decoding and jump-forward, behind a small interface (base.py)."""
