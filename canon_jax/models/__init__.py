"""canon_jax.models."""
