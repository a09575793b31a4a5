"""Gated SwiGLU MLP with the optional Canon-D (SPEC A.2), and the weight initialisers shared by the Llama layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.config import ModelConfig
from canon_jax.layers.canon import Canon, canon_kernel_init
from canon_jax.ops import linear
from canon_jax.ops.conv import causal_conv1d

__all__ = [
    "MLP",
    "Kernel",
    "SplitCanon",
    "weight_init",
    "make_canon",
    "make_split_canon",
    "compute_dtype",
    "fused_projection",
]


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


def weight_init(config: ModelConfig, fan: int):
    """Initialiser of a projection (``fan`` = its fan-in) or of the embedding/head (``fan`` = d) (SPEC A.2, A.3).

    By ``config.resolved_init_scheme``: ``"lingua"`` truncated normal with std ``fan^-1/2`` cut at +-3 std;
    ``"hf"`` N(0, ``init_std``); ``"torch"`` PyTorch's ``nn.Linear`` default U(-fan^-1/2, fan^-1/2).
    """
    scheme = config.resolved_init_scheme
    if scheme == "hf":
        return nn.initializers.normal(config.init_std)
    if scheme == "torch":
        bound = fan**-0.5
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.initializers.truncated_normal(fan**-0.5, lower=-3.0, upper=3.0)


def embedding_init(config: ModelConfig):
    """Token-embedding initialiser: lingua trunc-normal d^-1/2, else N(0, ``init_std``) (HF classes: 0.02 for
    GLA5/GDN2 and Llama, 0.1 for Mamba2)."""
    if config.resolved_init_scheme == "lingua":
        return weight_init(config, config.hidden_size)
    return nn.initializers.normal(config.init_std)


def make_canon(config: ModelConfig, channel_axis: str, name: str) -> Canon:
    """A Canon layer with the config's kernel size, residual, activation, bias and kernel implementation."""
    return Canon(
        kernel_size=config.canon_kernel,
        residual=config.canon_residual,
        activation="silu" if config.canon_activation else None,
        use_bias=config.canon_bias,
        channel_axis=channel_axis,
        param_dtype=jnp.dtype(config.param_dtype),
        impl=config.kernel_impl,
        name=name,
    )


class SplitCanon(nn.Module):
    """A Canon layer over ``concat(parts, -1)`` that never materialises the concatenation.

    Same parameters (``kernel: [K, sum(C_i)]``, optional ``bias``) and decode cache (``state: [batch, sum(C_i), K]``)
    as :class:`canon_jax.layers.Canon` on the concatenated tensor, so checkpoints and caches are interchangeable.
    A depthwise conv acts channel by channel, so convolving each part with its slice of the weight gives exactly the
    same numbers; skipping the concat/split of ``[batch, time, C]`` activations (and their gradients) roughly halves
    the Canon-B/D overhead of a training step on CPU (see docs/benchmarks.md, "Llama step").

    ``__call__(parts, *, segment_ids=None, decode=False)`` with ``parts``: list of ``[batch, time, C_i]``; returns the
    list of outputs (same shapes).
    """

    kernel_size: int = 4
    residual: bool = True
    activation: object = None
    use_bias: bool = False
    channel_axis: str = "qkv"
    param_dtype: object = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, parts, *, segment_ids=None, decode: bool = False):
        widths = [p.shape[-1] for p in parts]
        total = sum(widths)
        axes = ("conv_kernel", self.channel_axis)
        weight = self.param(
            "kernel", nn.with_logical_partitioning(canon_kernel_init, axes), (self.kernel_size, total), self.param_dtype
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.channel_axis,)),
                (total,),
                self.param_dtype,
            )
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        kw = dict(activation=self.activation, segment_ids=segment_ids, residual=self.residual, impl=self.impl)

        def conv(i, x, initial_state=None, final=False):
            o, c = offsets[i], widths[i]
            return causal_conv1d(
                x,
                weight[:, o : o + c],
                bias=None if bias is None else bias[o : o + c],
                initial_state=initial_state,
                return_final_state=final,
                **kw,
            )

        if not decode:  # named for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
            return [checkpoint_name(conv(i, x), "canon") for i, x in enumerate(parts)]
        is_init = not self.has_variable("cache", "state")
        state = self.variable("cache", "state", jnp.zeros, (parts[0].shape[0], total, self.kernel_size), parts[0].dtype)
        if is_init:  # the init call only creates the cache
            return [conv(i, x) for i, x in enumerate(parts)]
        outs, finals = [], []
        for i, x in enumerate(parts):
            o, c = offsets[i], widths[i]
            y, f = conv(i, x, state.value[:, o : o + c], final=True)
            outs.append(y)
            finals.append(f)
        state.value = jnp.concatenate(finals, axis=1)
        return outs


def make_split_canon(config: ModelConfig, channel_axis: str, name: str) -> SplitCanon:
    return SplitCanon(
        kernel_size=config.canon_kernel,
        residual=config.canon_residual,
        activation="silu" if config.canon_activation else None,
        use_bias=config.canon_bias,
        channel_axis=channel_axis,
        param_dtype=jnp.dtype(config.param_dtype),
        impl=config.kernel_impl,
        name=name,
    )


class Kernel(nn.Module):
    """Holds one projection weight ``kernel: [in, out]`` (same param path as ``nn.Dense(name=...)``) and returns it.

    Lets a layer use the raw weight, e.g. split the fused ``both_proj`` into its gate and up halves so that each half
    is its own GEMM feeding :class:`SplitCanon` (no ``[batch, time, 2 * ffn]`` activation to slice).
    """

    shape: tuple
    axes: tuple
    init: object
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), self.shape, self.param_dtype)


def fused_projection(x, kernels, dtype):
    """``x: [..., in]`` times ``concat(kernels, axis=1)`` -> ``[..., sum(out)]`` in ``dtype`` (one GEMM, with the
    hand-written VJP of ``canon_jax.ops.linear.matmul``)."""
    w = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1)
    return linear.matmul(x.astype(dtype), w.astype(dtype))


def mask_inputs(x, token_mask):
    """Zeroes ``x: [batch, time, ...]`` where ``token_mask: [batch, time]`` is False (no-op when it is None)."""
    if token_mask is None:
        return x
    return x * token_mask.reshape(token_mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)


class MLP(nn.Module):
    """``out = W2(SiLU(g) * u)`` with ``g = W1 x``, ``u = W3 x`` and Canon-D on ``concat(g, u)`` when enabled.

    ``x: [batch, time, d]`` -> ``[batch, time, d]``. ``fused=False`` keeps separate ``gate_proj``/``up_proj``
    (Hugging Face Llama names); ``fused=True`` uses one ``both_proj`` of width ``2 * ffn`` (the linear models' layout).
    Same math either way.
    """

    config: ModelConfig
    fused: bool = False

    @nn.compact
    def __call__(self, x, *, segment_ids=None, token_mask=None, decode: bool = False):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.ffn_dim()
        dt, pdt = compute_dtype(cfg), jnp.dtype(cfg.param_dtype)

        def dense(features, axes, fan, name):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=dt,
                param_dtype=pdt,
                dot_general=linear.dot_general,
                kernel_init=nn.with_logical_partitioning(weight_init(cfg, fan), axes),
                name=name,
            )

        if self.fused:
            w = Kernel((d, 2 * f), ("embed", "mlp"), weight_init(cfg, d), pdt, name="both_proj")()
            g, u = fused_projection(x, [w[:, :f]], dt), fused_projection(x, [w[:, f:]], dt)
        else:
            g, u = (
                fused_projection(x, [Kernel((d, f), ("embed", "mlp"), weight_init(cfg, d), pdt, name=n)()], dt)
                for n in ("gate_proj", "up_proj")
            )
        g = nn.with_logical_constraint(g, ("batch", "length", "mlp"))
        u = nn.with_logical_constraint(u, ("batch", "length", "mlp"))
        if cfg.has_canon("D"):  # Canon-D on concat(gate, up), computed part by part (see SplitCanon)
            seg = segment_ids if cfg.segment_aware else None
            g, u = make_split_canon(cfg, "mlp", "canon_d")(
                [mask_inputs(g, token_mask), mask_inputs(u, token_mask)], segment_ids=seg, decode=decode
            )
        h = nn.silu(g) * u
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(d, ("mlp", "embed"), f, "down_proj")(h)
