"""One list of implementation names (``pallas_kernels.common``): each op validates ``impl=`` against its own entry
with an error naming the op and the allowed names, ``ModelConfig.kernel_impl`` takes ``KERNEL_IMPLS`` (``"cpu"``
included), and ``"cpu"`` runs the scans' chunked XLA form (they have no native CPU kernel)."""

import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.config import ModelConfig
from canon_jax.ops import causal_conv1d, gated_delta_rule, gla, ssd
from pallas_kernels.common import IMPLEMENTATIONS, KERNEL_IMPLS, check_impl


def test_every_op_takes_the_config_names():
    for op, allowed in IMPLEMENTATIONS.items():
        if op != "attention":
            assert set(KERNEL_IMPLS) <= set(allowed), op
    assert "reference" in IMPLEMENTATIONS["gla"] and "reference" not in IMPLEMENTATIONS["causal_conv1d"]


def test_unknown_impl_names_op_and_choices():
    with pytest.raises(ValueError, match=r"ssd: unknown impl 'fast'; choose one of \('auto', 'xla', 'cpu'"):
        check_impl("ssd", "fast")
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match=r"causal_conv1d: unknown impl 'reference'; choose one of"):
        causal_conv1d(x, jnp.zeros((4, 8)), impl="reference")


def test_config_kernel_impl_uses_the_list():
    base = dict(vocab_size=23, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    assert ModelConfig(**base, kernel_impl="cpu").kernel_impl == "cpu"
    with pytest.raises(ValueError, match="ModelConfig.kernel_impl: must be one of"):
        ModelConfig(**base, kernel_impl="reference")


def test_cpu_impl_of_the_scans_is_the_chunked_xla_form():
    r = np.random.default_rng(0)
    q, k = (jnp.asarray(r.normal(size=(1, 10, 2, 8)), jnp.float32) for _ in range(2))
    v = jnp.asarray(r.normal(size=(1, 10, 2, 4)), jnp.float32)
    g = jnp.asarray(-r.uniform(0.0, 1.0, size=(1, 10, 2, 8)), jnp.float32)
    for a, b in zip(gla(q, k, v, g, impl="cpu", chunk_size=4), gla(q, k, v, g, impl="xla", chunk_size=4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    decay, beta = g[..., 0], jnp.full((1, 10, 2), 0.5)
    cpu = gated_delta_rule(q, k, v, decay, beta, impl="cpu", chunk_size=4)
    for a, b in zip(cpu, gated_delta_rule(q, k, v, decay, beta, impl="xla", chunk_size=4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dt, a_log = jnp.full((1, 10, 2), 0.1), jnp.array([-1.0, -2.0])
    bm = q[:, :, :1]
    for a, b in zip(
        ssd(v, dt, a_log, bm, bm, impl="cpu", chunk_size=4), ssd(v, dt, a_log, bm, bm, impl="xla", chunk_size=4)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
