"""The XLA Canon conv (the kernel-off path) compiled by the real TPU compiler for one v5e chip: its forward and
backward keep activations in the input dtype, so the program's temporaries stay below one float32 copy of the padded
input (bf16 ``[4, 4096, 2048]``: 128 MiB; before this was enforced the same program needed 512 MiB)."""

import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from canon_jax import aot  # noqa: E402
from canon_jax.ops.conv import causal_conv1d  # noqa: E402

pytestmark = pytest.mark.compile

B, T, C, K = 4, 4096, 2048, 4
MiB = 1 << 20


def _temp_bytes(activation, with_segments):
    dev = aot.get_target("v5e:1x1").devices[0]
    sh = jax.sharding.SingleDeviceSharding(dev)

    def fwd_bwd(x, w, dy, seg):
        f = lambda x, w: causal_conv1d(
            x, w, residual=True, activation=activation, segment_ids=seg if with_segments else None, impl="xla"
        )
        y, vjp = jax.vjp(f, x, w)
        return y, *vjp(dy)

    args = (
        jax.ShapeDtypeStruct((B, T, C), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((K, C), jnp.float32, sharding=sh),
        jax.ShapeDtypeStruct((B, T, C), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh),
    )
    return jax.jit(fwd_bwd).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_xla_conv_makes_no_float32_copy_of_its_input():
    f32_padded_copy = B * (T + K - 1) * C * 4
    temp = _temp_bytes(None, False)
    assert temp < f32_padded_copy / 8, f"{temp / MiB:.1f} MiB of temporaries"
    temp = _temp_bytes(None, True)  # segment masks are computed inside the passes, from the int ids
    assert temp < f32_padded_copy / 8, f"{temp / MiB:.1f} MiB of temporaries"


def test_xla_conv_with_silu_keeps_one_float32_gradient():
    """Through SiLU the conv's gradient ``dy * silu'(pre)`` is one float32 ``[B, T, C]`` array (kept in float32 as
    the Pallas kernel does); nothing else of that size."""
    temp = _temp_bytes("silu", True)
    assert temp < B * T * C * 4 + 4 * MiB, f"{temp / MiB:.1f} MiB of temporaries"
