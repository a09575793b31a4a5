"""canon_jax.train."""
