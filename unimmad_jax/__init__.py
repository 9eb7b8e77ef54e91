"""UniMMAD in JAX/Flax."""
