"""Flax modules of UniMMAD (SPEC 2)."""
