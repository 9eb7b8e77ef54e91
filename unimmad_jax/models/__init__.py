"""Flax modules of UniMMAD (docs/model.md#the-network)."""
