"""Run by test_attention_kernels.py in a subprocess with 4 simulated CPU devices: splash (interpreted) under
shard_map on a (data 1, fsdp 2, tensor 2) mesh equals the unsharded call, values and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from canon_jax.ops.attention import flash_attention, splash_attention
from canon_jax.train.sharding import LOGICAL_RULES, MESH_AXES

jax.config.update("jax_default_matmul_precision", "highest")


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((1, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 40, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 40, 2, 16)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(1, 4, (4, 40))), jnp.int32)
    loss = lambda f, q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    plain = lambda q, k, v: splash_attention(q, k, v, segment_ids=seg, interpret=True)
    shard = lambda q, k, v: flash_attention("splash_interpret", q, k, v, segment_ids=seg)
    ref = jax.jit(plain)(q, k, v), jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2)))(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        step = jax.jit(shard)
        text = step.lower(q, k, v).as_text()
        assert "shard_map" in text or "sdy.manual_computation" in text, "splash is not under shard_map"
        out = step(q, k, v), jax.jit(jax.grad(functools.partial(loss, shard), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=1e-5)
    print("SHARDED_ATTENTION_OK")


if __name__ == "__main__":
    main()
