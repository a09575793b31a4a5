"""canon_jax.interop."""
