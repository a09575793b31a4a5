"""The ``impl=`` bridge in ``canon_jax.ops.dispatch`` for the kernels."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops import dispatch
from pallas_kernels.linear_scan import gla_reference


def test_linear_scan_routes_and_falls_back():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 1, 8)), jnp.float32) for _ in range(3))
    g = jnp.asarray(np.log(rng.uniform(0.7, 1.0, (1, 6, 1, 8))), jnp.float32)
    assert dispatch.linear_scan("xla", "gla", q, k, v, g) is None
    if dispatch.accelerator_backend() is None:
        assert dispatch.linear_scan("auto", "gla", q, k, v, g) is None
        with pytest.raises(NotImplementedError, match="pallas_interpret"):
            dispatch.linear_scan("pallas", "gla", q, k, v, g)
    o, s = jax.jit(lambda *a: dispatch.linear_scan("pallas_interpret", "gla", *a, chunk_size=16))(q, k, v, g)
    ro, rs = gla_reference(q, k, v, g)
    np.testing.assert_allclose(np.asarray(o), ro, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), rs, atol=1e-5)
    y, h = jax.jit(lambda *a: dispatch.ssd("pallas_interpret", *a, chunk_size=8))(
        v, jnp.full((1, 6, 1), 0.1), jnp.array([-1.0]), k, q, jnp.array([0.5]))
    chex.assert_shape((y, h), ((1, 6, 1, 8), (1, 1, 8, 8)))
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.linear_scan("auto", "gdn", q, k, v, g)
    with pytest.raises(ValueError, match="unknown impl"):
        dispatch.linear_scan("fast", "gla", q, k, v, g)
