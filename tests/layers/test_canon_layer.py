import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.layers import Canon
from canon_jax.ops import causal_conv1d


@pytest.mark.parametrize("k", [1, 4, 6])
def test_init_is_pytorch_conv1d_default(k):
    params = Canon(kernel_size=k).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 4096)))["params"]
    w = np.asarray(nn.meta.unbox(params)["kernel"])
    chex.assert_shape(w, (k, 4096))
    bound = 1 / np.sqrt(k)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound  # uniform over the whole range
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05)


def test_bias_initialised_to_zero_and_used():
    layer = Canon(use_bias=True, activation="silu")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
    np.testing.assert_array_equal(np.asarray(params["bias"]), 0)
    params["bias"] = jnp.full((8,), 0.5)
    y = layer.apply({"params": params}, x)
    ref = causal_conv1d(x, params["kernel"], bias=params["bias"], activation="silu", residual=True)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6)


def test_decode_cache_equals_full_pass():
    layer = Canon(kernel_size=4)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 8))
    variables = layer.init(jax.random.PRNGKey(0), x[:, :1], decode=True)
    params, cache = variables["params"], variables["cache"]
    chex.assert_shape(cache["state"], (2, 8, 4))
    full = layer.apply({"params": params}, x)
    y_pre, upd = layer.apply({"params": params, "cache": cache}, x[:, :3], decode=True, mutable=["cache"])
    outs, cache = [y_pre], upd["cache"]
    for t in range(3, 9):
        y_t, upd = layer.apply({"params": params, "cache": cache}, x[:, t : t + 1], decode=True, mutable=["cache"])
        outs.append(y_t)
        cache = upd["cache"]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-6)


# ---- the one Canon module against a float64 reference -------------------------------------------------------------
def canon_np(x, w, b=None, residual=True, silu=False, segment_ids=None, token_mask=None, history=None):
    """Float64 loop: ``y[t] = x[t] + act(sum_j w[j] x[t - (K-1) + j] + b)`` over taps of the same segment (and the
    ``history`` rows ``[batch, K, channels]`` before ``t = 0``, treated as the first token's segment)."""
    x = np.asarray(x, np.float64)
    if token_mask is not None:
        x = x * np.asarray(token_mask, np.float64)[..., None]
    bsz, t, c = x.shape
    k = w.shape[0]
    y = np.zeros_like(x)
    for n in range(bsz):
        for i in range(t):
            acc = np.zeros(c) if b is None else np.asarray(b, np.float64).copy()
            for j in range(k):
                s = i - (k - 1) + j
                if s >= 0 and (segment_ids is None or segment_ids[n, s] == segment_ids[n, i]):
                    acc += w[j] * x[n, s]
                elif s < 0 and history is not None:
                    acc += w[j] * history[n, k + s]
            if silu:
                acc = acc / (1 + np.exp(-acc))
            y[n, i] = acc + (x[n, i] if residual else 0.0)
    return y


CASES = [  # residual, activation, bias, split widths (None = one array), segments, token mask
    (True, None, False, None, False, False),
    (False, "silu", True, None, True, False),
    (True, "silu", True, (5, 3, 4), True, True),
    (False, None, False, (2, 6), False, True),
]


@pytest.mark.parametrize("residual,activation,bias,widths,segments,masked", CASES)
def test_matches_float64_reference_values_and_gradients(residual, activation, bias, widths, segments, masked):
    rng = np.random.default_rng(3)
    c = 12 if widths is None else sum(widths)
    x = rng.normal(size=(2, 7, c)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 2, 2, 2, 3, 3, 3]], np.int32) if segments else None
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool) if masked else None
    layer = Canon(kernel_size=3, residual=residual, activation=activation, use_bias=bias)
    params = {"kernel": rng.normal(size=(3, c)).astype(np.float32)}
    if bias:
        params["bias"] = rng.normal(size=(c,)).astype(np.float32)
    cut = lambda a: a if widths is None else list(np.split(a, np.cumsum(widths)[:-1], -1))
    kw = dict(segment_ids=None if seg is None else jnp.asarray(seg), token_mask=None if mask is None else mask)

    def f(p, xs):
        y = layer.apply({"params": p}, xs, **kw)
        return y if widths is None else jnp.concatenate(y, -1)

    y = layer.apply({"params": params}, cut(jnp.asarray(x)), **kw)
    if widths is None:
        chex.assert_shape(y, (2, 7, c))
    else:
        chex.assert_shape(y, [(2, 7, w) for w in widths])
    ref_fn = lambda w, b, xx: canon_np(xx, w, b, residual, activation == "silu", seg, mask)
    ref = ref_fn(params["kernel"].astype(np.float64), params.get("bias"), x)
    np.testing.assert_allclose(np.asarray(f(params, cut(jnp.asarray(x)))), ref, rtol=1e-5, atol=1e-5)

    # gradients of <y, r> against central differences of the float64 reference
    r = rng.normal(size=ref.shape)
    loss = lambda p, xs: jnp.sum(f(p, xs) * jnp.asarray(r, jnp.float32))
    gp, gx = jax.grad(loss, argnums=(0, 1))(params, cut(jnp.asarray(x)))
    gx = gx if widths is None else jnp.concatenate(gx, -1)
    chex.assert_shape(gx, x.shape)
    w64, b64, x64 = params["kernel"].astype(np.float64), params.get("bias"), x.astype(np.float64)
    b64 = None if b64 is None else b64.astype(np.float64)

    def fd(arr, fn):
        g = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            hi, lo = arr.copy(), arr.copy()
            hi[idx] += 1e-6
            lo[idx] -= 1e-6
            g[idx] = (np.sum(fn(hi) * r) - np.sum(fn(lo) * r)) / 2e-6
        return g

    np.testing.assert_allclose(np.asarray(gp["kernel"]), fd(w64, lambda w: ref_fn(w, b64, x64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), fd(x64, lambda xx: ref_fn(w64, b64, xx)), rtol=1e-4, atol=1e-4)
    if bias:
        np.testing.assert_allclose(np.asarray(gp["bias"]), fd(b64, lambda b: ref_fn(w64, b, x64)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("widths", [None, (3, 5)])
def test_decode_prefill_and_steps_match_float64_reference(widths):
    """Prefill with a left-padding mask, then single-token steps: each output equals the float64 reference of the
    whole sequence, and the cache holds the last K raw (masked) inputs."""
    rng = np.random.default_rng(4)
    c, t, k = 8, 6, 3
    x = rng.normal(size=(2, t, c)).astype(np.float32)
    mask = np.ones((2, t), bool)
    mask[0, :2] = False
    layer = Canon(kernel_size=k, activation="silu", use_bias=True)
    params = {"kernel": rng.normal(size=(k, c)).astype(np.float32), "bias": rng.normal(size=(c,)).astype(np.float32)}
    cut = lambda a: a if widths is None else list(jnp.split(a, [widths[0]], -1))
    join = lambda y: y if widths is None else jnp.concatenate(y, -1)
    cache = layer.init(jax.random.key(0), cut(jnp.asarray(x[:, :1])), decode=True)["cache"]
    chex.assert_shape(cache["state"], (2, c, k))
    outs = []
    prefill = cut(jnp.asarray(x[:, :3]))
    variables = {"params": params, "cache": cache}
    y, v = layer.apply(variables, prefill, token_mask=mask[:, :3], decode=True, mutable=["cache"])
    outs.append(join(y))
    for i in range(3, t):
        y, v = layer.apply({"params": params, **v}, cut(jnp.asarray(x[:, i : i + 1])), decode=True, mutable=["cache"])
        chex.assert_shape(join(y), (2, 1, c))
        outs.append(join(y))
    ref = canon_np(x, params["kernel"].astype(np.float64), params["bias"], True, True, None, mask)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v["cache"]["state"]), np.swapaxes(x[:, -k:], 1, 2), atol=0)


def test_bad_input():
    x = jnp.zeros((2, 5, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        Canon(kernel_size=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="batch, time, channels"):
        Canon().init(jax.random.key(0), [x, jnp.zeros((2, 4, 4))])
    with pytest.raises(ValueError, match="batch, time, channels"):
        Canon().init(jax.random.key(0), [])


# ---- canon_from_config: every position of every architecture ------------------------------------------------------
# position -> (kernel size, residual, SiLU, bias, logical channel axis, name) under MAPPING_CFG; "b" depends on the arch
MAPPING_CFG = dict(
    canon_kernel=3, canon_residual=False, canon_activation=True, canon_bias=True, conv_size=2, initializer_range=0.05
)
EXPECTED = {
    "A": (3, False, True, True, "embed", "canon_a"),
    "B": (3, False, True, True, "qkv", "canon_b"),
    "C": (3, False, True, True, "embed", "canon_c"),
    "D": (3, False, True, True, "mlp", "canon_d"),
}
EXPECTED_B_LOWER = {"gla": (2, False, True, False, "qkv", "conv"), "mamba2": (2, False, True, True, "qkv", "conv")}
EXPECTED_B_LOWER["gdn"] = EXPECTED_B_LOWER["gla"]


@pytest.mark.parametrize("arch", ["llama", "gla", "gdn", "mamba2"])
def test_canon_from_config_maps_each_position(arch):
    from canon_jax.config import CANON_LETTERS, ModelConfig
    from canon_jax.layers import canon_from_config

    cfg = ModelConfig(arch=arch, **MAPPING_CFG)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    for pos in CANON_LETTERS[arch]:
        k, residual, silu, bias, axis, name = EXPECTED[pos] if pos != "b" else EXPECTED_B_LOWER[arch]
        layer = canon_from_config(cfg, pos, "conv" if pos == "b" else None)
        assert layer.name == name, pos
        boxed = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
        assert boxed["kernel"].names == ("conv_kernel", axis), pos
        params = nn.meta.unbox(boxed)
        chex.assert_shape(params["kernel"], (k, 6))
        assert ("bias" in params) == bias, pos
        params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
        y = layer.apply({"params": params}, jnp.asarray(x))
        chex.assert_shape(y, x.shape)
        b = np.asarray(params["bias"], np.float64) if bias else None
        ref = canon_np(x, np.asarray(params["kernel"], np.float64), b, residual, silu)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5, err_msg=pos)


@pytest.mark.parametrize("arch", ["llama", "gla", "mamba2"])
def test_canon_from_config_inits(arch):
    """A-D: PyTorch Conv1d default U(+-1/sqrt(K)) and zero bias; b: N(0, initializer_range) for GLA5/GDN2, PyTorch
    Conv1d default weight and bias for Mamba2."""
    from canon_jax.config import CANON_LETTERS, ModelConfig
    from canon_jax.layers import canon_from_config

    cfg = ModelConfig(arch=arch, **MAPPING_CFG)
    x = jnp.zeros((1, 2, 2048))
    for pos in CANON_LETTERS[arch]:
        params = nn.meta.unbox(canon_from_config(cfg, pos, "conv").init(jax.random.key(1), x)["params"])
        w = np.asarray(params["kernel"], np.float64)
        if pos == "b" and arch != "mamba2":
            np.testing.assert_allclose(w.std(), 0.05, rtol=0.05)
            assert "bias" not in params
            continue
        bound = 1 / np.sqrt(w.shape[0])
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05)
        b = np.asarray(params["bias"], np.float64)
        if pos == "b":  # Mamba2's conv1d bias: U(+-1/sqrt(K)) like the weight
            assert np.abs(b).max() <= bound
            np.testing.assert_allclose(b.std(), bound / np.sqrt(3), rtol=0.1)
        else:
            np.testing.assert_array_equal(b, 0)


def test_canon_from_config_bad_positions():
    from canon_jax.config import ModelConfig
    from canon_jax.layers import canon_from_config

    with pytest.raises(ValueError, match="position 'b'.*llama"):
        canon_from_config(ModelConfig(), "b", "conv1d")
    with pytest.raises(ValueError, match="position 'E'"):
        canon_from_config(ModelConfig(arch="gla"), "E")
    with pytest.raises(ValueError, match="explicit name"):
        canon_from_config(ModelConfig(arch="gla"), "b")
