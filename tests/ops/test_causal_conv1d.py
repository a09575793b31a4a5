"""The Canon conv op against the official outputs and an independent float64 loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canon_jax.ops import causal_conv1d, causal_conv1d_step
from canon_jax.ops import cpu as native_cpu


def conv_loop64(x, w, bias=None, activation=None, residual=False, segment_ids=None, initial_state=None):
    """Float64 reference: y[b,t,c] = sum_j w[j,c] x[b, t-(K-1)+j, c]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    b_, t_, c_ = x.shape
    k = w.shape[0]
    hist = (
        np.zeros((b_, k - 1, c_))
        if initial_state is None
        else np.swapaxes(np.asarray(initial_state, np.float64), 1, 2)[:, 1:]
    )
    y = np.zeros_like(x)
    for b in range(b_):
        for t in range(t_):
            acc = np.zeros(c_)
            for j in range(k):
                s = t - (k - 1) + j
                if s >= 0:
                    if segment_ids is not None and segment_ids[b, s] != segment_ids[b, t]:
                        continue
                    acc += w[j] * x[b, s]
                else:
                    if segment_ids is not None and segment_ids[b, 0] != segment_ids[b, t]:
                        continue
                    acc += w[j] * hist[b, k - 1 + s]
            if bias is not None:
                acc += bias
            if activation == "silu":
                acc = acc / (1 + np.exp(-acc))
            y[b, t] = acc + (x[b, t] if residual else 0)
    return y


# the pure-XLA path and the native XLA:CPU FFI kernel (canon_jax/ops/cpu; needs a C++ compiler on the machine)
needs_native = pytest.mark.skipif(
    not native_cpu.available(), reason=f"native CPU kernel unavailable: {native_cpu.unavailable_reason()}"
)
IMPLS = ["xla", pytest.param("cpu", marks=needs_native)]


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_official_outputs(refs_dir, impl):
    z = np.load(refs_dir / "ops" / "canon_conv_k4.npz")
    x = jnp.asarray(z["x"])
    w = jnp.asarray(z["weight"][:, 0, :].T)  # PyTorch [C, 1, K] -> [K, C]
    cases = {
        "y": (None, False),
        "y_silu": ("silu", False),
        "y_residual": (None, True),
        "y_silu_residual": ("silu", True),
    }
    for name, (act, res) in cases.items():
        y = causal_conv1d(x, w, activation=act, residual=res, impl=impl)
        chex.assert_shape(y, x.shape)
        np.testing.assert_allclose(np.asarray(y), z[name], atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("prefill", [2, 7])
def test_decode_states_match_official(refs_dir, prefill):
    z = np.load(refs_dir / "ops" / "canon_conv_k4.npz")
    x = jnp.asarray(z["x"])
    w = jnp.asarray(z["weight"][:, 0, :].T)
    y0, state = causal_conv1d(x[:, :prefill], w, return_final_state=True)
    chex.assert_shape(state, (2, 32, 4))
    np.testing.assert_allclose(np.asarray(state), z[f"decode_P{prefill}_state_after_prefill"], atol=0)
    outs = [y0]
    for t in range(prefill, x.shape[1]):
        y_t, state = causal_conv1d_step(x[:, t], state, w)
        chex.assert_shape(y_t, (2, 32))
        outs.append(y_t[:, None])
        if t == prefill:
            np.testing.assert_allclose(np.asarray(state), z[f"decode_P{prefill}_state_after_first_step"], atol=0)
    np.testing.assert_allclose(np.asarray(state), z[f"decode_P{prefill}_state_final"], atol=0)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), z["y"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("t", [1, 3, 9, 33])
def test_against_float64_loop(k, t, impl):
    rng = np.random.default_rng(k * 100 + t)
    x = rng.standard_normal((2, t, 6)).astype(np.float32)
    w = rng.uniform(-1, 1, (k, 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    for act in (None, "silu"):
        for res in (False, True):
            y = causal_conv1d(
                jnp.asarray(x), jnp.asarray(w), bias=jnp.asarray(bias), activation=act, residual=res, impl=impl
            )
            chex.assert_shape(y, x.shape)
            np.testing.assert_allclose(np.asarray(y), conv_loop64(x, w, bias, act, res), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_initial_state_equals_continuation(k, impl):
    """Splitting a sequence and carrying the state equals one pass over the whole (any split, T < K included)."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((2, 11, 5)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, 5)).astype(np.float32))
    full, full_state = causal_conv1d(x, w, residual=True, return_final_state=True, impl=impl)
    for split in (1, 2, k, 10):
        split = min(split, 10)
        y1, s1 = causal_conv1d(x[:, :split], w, residual=True, return_final_state=True, impl=impl)
        y2, s2 = causal_conv1d(x[:, split:], w, residual=True, initial_state=s1, return_final_state=True, impl=impl)
        chex.assert_shape([s1, s2], (2, 5, k))
        np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(full), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s2), np.asarray(full_state), atol=0)
        np.testing.assert_allclose(
            np.asarray(y2), conv_loop64(x[:, split:], w, residual=True, initial_state=s1), atol=1e-5
        )


def test_final_state_short_sequence_zero_padded():
    x = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 2, 3)
    _, s = causal_conv1d(x, jnp.ones((4, 3)), return_final_state=True)
    chex.assert_shape(s, (1, 3, 4))
    np.testing.assert_array_equal(np.asarray(s[0, 0]), [0, 0, 1, 4])


@pytest.mark.parametrize("k", [2, 4, 5])
def test_segment_ids_never_mix(k):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 13, 4)).astype(np.float32)
    w = rng.standard_normal((k, 4)).astype(np.float32)
    seg = np.array([[0] * 5 + [1] * 2 + [2] * 6, [3] * 1 + [4] * 12])
    y = causal_conv1d(jnp.asarray(x), jnp.asarray(w), segment_ids=jnp.asarray(seg), residual=True)
    chex.assert_shape(y, x.shape)
    np.testing.assert_allclose(np.asarray(y), conv_loop64(x, w, residual=True, segment_ids=seg), atol=1e-5)
    # each segment alone gives the same output as running it as its own sequence
    for b, (lo, hi) in [(0, (5, 7)), (0, (7, 13)), (1, (1, 13))]:
        alone = causal_conv1d(jnp.asarray(x[b : b + 1, lo:hi]), jnp.asarray(w), residual=True)
        np.testing.assert_allclose(np.asarray(y[b : b + 1, lo:hi]), np.asarray(alone), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_float64_finite_differences(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 3))
    w = rng.standard_normal((3, 3))
    g = rng.standard_normal((1, 6, 3))

    def f(x, w):
        return jnp.sum(causal_conv1d(x, w, activation="silu", residual=True, impl=impl) * g)

    dx, dw = jax.grad(f, argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    chex.assert_shape([dx, dw], [x.shape, w.shape])

    def f64(x, w):
        return np.sum(conv_loop64(x, w, activation="silu", residual=True) * g)

    eps = 1e-6
    for arr, grad in ((x, dx), (w, dw)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            fp = f64(x, w)
            arr[idx] = old - eps
            fm = f64(x, w)
            arr[idx] = old
            num[idx] = (fp - fm) / (2 * eps)
        np.testing.assert_allclose(np.asarray(grad), num, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise():
    x = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(x, jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="K must be >= 1"):
        causal_conv1d(x, jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, jnp.zeros((4, 3)), activation="relu")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, jnp.zeros((4, 3)), initial_state=jnp.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="impl"):
        causal_conv1d(x, jnp.zeros((4, 3)), impl="cuda")
    with pytest.raises(NotImplementedError, match="pallas"):
        causal_conv1d(x, jnp.zeros((4, 3)), impl="pallas")


# The native kernel works in blocks of 32 time steps (forward) and 128 (backward: T=300 spans three); K 1-4 are
# compile-time specialisations, 5 and 7 the generic body, 70 (> 64 taps) its tap-by-tap form; C is not a multiple
# of the SIMD width, and (K+1)*300 > 512 spans reduction blocks.
_NATIVE_CASES = [(k, t, c) for k in (1, 2, 3, 4, 5, 7) for t in (1, 3, 40, 77) for c in (70, 300)]
_NATIVE_CASES += [(4, 300, 300), (5, 300, 70), (70, 3, 70)]


@needs_native
@pytest.mark.parametrize("k,t,c", _NATIVE_CASES)
def test_native_cpu_kernel_gradients_equal_xla(k, t, c):
    """Every gradient of the native CPU kernel (x, weight, bias, initial state) against the XLA path, which is itself
    checked against float64 finite differences above."""
    rng = np.random.default_rng(k * 1000 + t + c)
    x = jnp.asarray(rng.standard_normal((3, t, c)).astype(np.float32))
    w = jnp.asarray(rng.uniform(-1, 1, (k, c)).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(c).astype(np.float32))
    state = jnp.asarray(rng.standard_normal((3, c, k)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((3, t, c)).astype(np.float32))
    for act in (None, "silu"):
        for res in (False, True):

            def loss(x, w, bias, state, impl):
                y = causal_conv1d(x, w, bias=bias, activation=act, residual=res, initial_state=state, impl=impl)
                return jnp.sum(y * g)

            got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(x, w, bias, state, "cpu")
            want = jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, bias, state, "xla")
            chex.assert_shape(got, [x.shape, w.shape, bias.shape, state.shape])
            for name, a, b in zip(("dx", "dw", "dbias", "dstate"), got, want):
                np.testing.assert_allclose(
                    np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=f"{name} act={act} residual={res}"
                )


@needs_native
def test_native_cpu_kernel_scope_and_portability():
    x = jnp.ones((1, 5, 3))
    w = jnp.ones((4, 3))
    with pytest.raises(NotImplementedError, match="segment_ids"):
        causal_conv1d(x, w, segment_ids=jnp.zeros((1, 5), jnp.int32), impl="cpu")
    with pytest.raises(NotImplementedError, match="float32 only"):
        causal_conv1d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), impl="cpu")
    # "auto" on CPU takes the native kernel for float32 and stays exportable to other platforms: the FFI call is
    # lowered only for CPU (jax.lax.platform_dependent), TPU/CUDA lowerings get the XLA formulas
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(causal_conv1d(x, w, residual=True) ** 2), argnums=(0, 1)))
    assert "canon_jax_conv" in f.lower(x, w).as_text()
    exp = jax.export.export(f, platforms=["tpu", "cuda"])(x, w)
    assert "canon_jax_conv" not in exp.mlir_module()
    # vmap over an extra leading axis
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 5, 3)).astype(np.float32))
    ys = jax.vmap(lambda x: causal_conv1d(x, w, residual=True, impl="cpu"))(xs)
    chex.assert_shape(ys, xs.shape)
    np.testing.assert_allclose(
        np.asarray(ys[1]), np.asarray(causal_conv1d(xs[1], w, residual=True, impl="xla")), atol=1e-6
    )


def test_native_cpu_kernel_disabled(monkeypatch):
    """Turned off (or without a compiler) "auto" stays on the XLA path and "cpu" names the reason."""
    monkeypatch.setenv("CANON_JAX_DISABLE_CPU_KERNELS", "1")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 3)).astype(np.float32))
    w = jnp.ones((4, 3))
    with pytest.raises(NotImplementedError, match="disabled by"):
        causal_conv1d(x, w, impl="cpu")
    f = jax.jit(lambda x: causal_conv1d(x, w, residual=True))
    native_cpu._state.pop("warned", None)
    with pytest.warns(RuntimeWarning, match="native CPU conv kernel unavailable"):
        assert "canon_jax_conv" not in f.lower(x).as_text()
    np.testing.assert_allclose(np.asarray(f(x)), conv_loop64(x, w, residual=True), atol=1e-5)
