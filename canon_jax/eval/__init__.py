"""canon_jax.eval."""
