"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import BlockSizes
from pallas_kernels.linear_scan import gla, ssd
from pallas_kernels.sharding import shard_map_call
from pallas_kernels.short_conv import short_conv

P = jax.sharding.PartitionSpec
TOK, ST = P("batch", None, "heads", None), P("batch", "heads", None, None)

jax.config.update("jax_default_matmul_precision", "highest")


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("channels", "model"), ("heads", "model"))
    rng = np.random.default_rng(0)
    close = functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5)

    # short conv: values and gradients (the weight gradient is a reduction over batch shards)
    x = jnp.asarray(rng.standard_normal((4, 13, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(32), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(1, 3, (4, 13)), axis=1), jnp.int32)
    kw = dict(interpret=True, block_sizes=BlockSizes(block_t=8, block_d=16), activation="silu", residual=True)
    # inputs already laid out on the mesh, as under a sharded training step
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "model")))
    plain = lambda x, w, bias: short_conv(x, w, bias=bias, segment_ids=seg, **kw)
    shard = lambda x, w, bias: shard_map_call(
        lambda x, w, bias, seg: short_conv(x, w, bias=bias, segment_ids=seg, **kw),
        x,
        w,
        bias,
        seg,
        in_axes=(P("batch", None, "channels"), P(None, "channels"), P("channels"), P("batch", None)),
        out_axes=P("batch", None, "channels"),
        rules=rules,
        mesh=mesh,
    )
    close(jax.jit(shard)(x, w, bias), jax.jit(plain)(x, w, bias))
    loss = lambda f, *a: jnp.sum(jnp.sin(f(*a)))
    for a, r in zip(
        jax.jit(jax.grad(functools.partial(loss, shard), argnums=(0, 1, 2)))(x, w, bias),
        jax.jit(jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2)))(x, w, bias),
    ):
        close(a, r)

    # GLA
    q, k = (jnp.asarray(rng.standard_normal((4, 11, 2, 8)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((4, 11, 2, 8)), jnp.float32)
    g = jnp.asarray(np.log(rng.uniform(0.6, 1.0, (4, 11, 2, 8))), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((4, 2, 8, 8)), jnp.float32)
    skw = dict(chunk_size=8, interpret=True, block_sizes=BlockSizes(sub_chunk=8))
    local = lambda q, k, v, g, s0: gla(q, k, v, g, initial_state=s0, **skw)
    sharded = lambda *z: shard_map_call(
        local, *z, s0, in_axes=(TOK,) * 4 + (ST,), out_axes=(TOK, ST), rules=rules, mesh=mesh
    )
    a = jax.jit(sharded)(q, k, v, g)
    r = jax.jit(lambda *z: gla(*z, initial_state=s0, **skw))(q, k, v, g)
    for u, z in zip(a, r):
        close(u, z)

    # SSD
    xs = jnp.asarray(rng.standard_normal((4, 11, 2, 8)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.01, 0.3, (4, 11, 2)), jnp.float32)
    aa = jnp.asarray(-rng.uniform(0.5, 3.0, 2), jnp.float32)
    bm, cm = (jnp.asarray(rng.standard_normal((4, 11, 1, 8)), jnp.float32) for _ in range(2))
    d = jnp.ones(2, jnp.float32)
    ssd_axes = (TOK, P("batch", None, "heads"), P("heads"), P("batch", None, None, None), P("batch", None, None, None))
    sharded = lambda *z: shard_map_call(
        lambda *a: ssd(*a, chunk_size=8, interpret=True),
        *z,
        in_axes=ssd_axes + (P("heads"),),
        out_axes=(TOK, ST),
        rules=rules,
        mesh=mesh,
    )
    a = jax.jit(sharded)(xs, dt, aa, bm, cm, d)
    r = jax.jit(lambda *z: ssd(*z, chunk_size=8, interpret=True))(xs, dt, aa, bm, cm, d)
    for u, z in zip(a, r):
        close(u, z)
    print("SHARDED_OK")


if __name__ == "__main__":
    main()
