"""canon_jax.data."""
