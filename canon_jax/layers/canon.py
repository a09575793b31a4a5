"""Canon layers (Physics of Language Models, Part 4.1): depthwise causal convolutions over time.

One module, :class:`Canon`, serves every position of every architecture, and one function,
:func:`canon_from_config`, maps a :class:`~canon_jax.config.ModelConfig` position to it:

* ``"A"``: before the token mixer, on the normalised block input (width ``d``).
* ``"B"``: inside the mixer, on its projections (Llama: ``concat(q, k, v)``; GLA5/GDN2: ``concat(q, k, v)`` after
  Canon-b; Mamba2: the whole ``in_proj`` output).
* ``"C"``: before the MLP, on the normalised input (width ``d``).
* ``"D"``: inside the MLP, on ``concat(gate, up)``.
* ``"b"``: the linear architectures' own short conv (GLA5/GDN2: one per q, k, v; Mamba2: ``conv1d`` on ``xBC``),
  non-residual, with SiLU.

``A``-``D`` share the config's ``canon_kernel``, ``canon_residual``, ``canon_activation`` and ``canon_bias``;
``b`` uses ``conv_size`` and the init of the official architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from canon_jax.config import CANON_LETTERS, ModelConfig
from canon_jax.layers.init import canon_kernel_init, normal_init, torch_default_init
from canon_jax.layers.masking import mask_tokens
from canon_jax.ops.conv import causal_conv1d, causal_conv1d_step
from pallas_kernels.common import target_platform

__all__ = ["Canon", "canon_from_config", "canon_site", "canon_kernel_init", "normalize_canon_set", "CANON_PRESETS"]

# logical axis of the channels at each position (the sharding rules map these to mesh axes)
_CHANNEL_AXIS = {"A": "embed", "B": "qkv", "C": "embed", "D": "mlp", "b": "qkv"}

# Recipe names of ``canon_set``. The official spelling doubles "b" ("bb", "AbbCD") only to tell its files apart from
# "ABCD" on case-insensitive file systems; it means the same as a single "b".
CANON_PRESETS = {"conv": "b", "Canon": "AbCD"}


def normalize_canon_set(canon_set: str) -> str:
    """Maps a preset name (``"conv"``, ``"Canon"``) or an official spelling (``"bb"``, ``"AbbCD"``) to the letters,
    each once, in their original order: ``"AbbCD" -> "AbCD"``."""
    canon_set = CANON_PRESETS.get(canon_set, canon_set)
    return "".join(dict.fromkeys(canon_set))


class Canon(nn.Module):
    """``y = x + act(conv(x) + bias)`` on ``x: [batch, time, channels]`` (no ``x +`` unless ``residual``).

    ``conv`` is depthwise and causal with weight ``kernel: [kernel_size, channels]`` (the last tap on the current
    token); ``act`` is SiLU for ``activation="silu"``; ``bias: [channels]`` exists only with ``use_bias``.

    ``__call__(x, *, segment_ids=None, token_mask=None, decode=False)``:

    * ``x`` may be a list of parts ``[batch, time, C_i]`` instead of one array: the layer then acts on
      ``concat(parts, -1)`` without building it (a depthwise conv is channel by channel, so each part is convolved
      with its slice of the weight) and returns the list of outputs. Parameters and decode state are those of the
      concatenated layer, so both forms are interchangeable; skipping the concat/split of the activations roughly
      halves the Canon-B/D overhead of a CPU training step (docs/benchmarks.md, "Llama step").
    * ``segment_ids``: int ``[batch, time]``; taps never reach another segment (packed documents).
    * ``token_mask``: bool ``[batch, time]``; inputs are zeroed where False, so masked tokens influence nothing.
    * ``decode=True`` keeps the last ``kernel_size`` raw inputs in the ``"cache"`` collection
      (``state: [batch, channels, kernel_size]``): the first (init) call only creates it; later calls read and update
      it, for a prefill of any length or single-token steps.
    """

    kernel_size: int = 4
    residual: bool = True
    activation: str | None = None
    use_bias: bool = False
    channel_axis: str = "embed"
    kernel_init: Callable[..., Any] = canon_kernel_init
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, *, segment_ids=None, token_mask=None, decode: bool = False):
        split = isinstance(x, (list, tuple))
        parts = list(x) if split else [x]
        if self.kernel_size < 1:
            raise ValueError(f"Canon: kernel_size must be >= 1, got {self.kernel_size}")
        if not parts or any(p.ndim != 3 or p.shape[:2] != parts[0].shape[:2] for p in parts):
            raise ValueError(f"Canon: inputs must be [batch, time, channels] arrays, got {[p.shape for p in parts]}")
        parts = [mask_tokens(p, token_mask) for p in parts]
        widths = [p.shape[-1] for p in parts]
        offsets = [sum(widths[:i]) for i in range(len(parts))]
        channels = sum(widths)
        axes = ("conv_kernel", self.channel_axis)
        weight = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, axes),
            (self.kernel_size, channels),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, (self.channel_axis,)),
                (channels,),
                self.param_dtype,
            )
        kw = dict(activation=self.activation, residual=self.residual)
        if split:  # each part's slice of the weight, bias (and state below)
            cut = lambda a, i: None if a is None else a[..., offsets[i] : offsets[i] + widths[i]]
        else:
            cut = lambda a, i: a
        run = lambda i, **k: causal_conv1d(
            parts[i], cut(weight, i), bias=cut(bias, i), segment_ids=segment_ids, impl=self.impl, **kw, **k
        )

        if not decode:  # named for the remat policies (canon_jax.models.causal_lm.REMAT_POLICIES)
            outs = [checkpoint_name(run(i), "canon") for i in range(len(parts))]
        elif not self.has_variable("cache", "state"):  # the init call only creates the cache
            self.variable("cache", "state", jnp.zeros, (parts[0].shape[0], channels, self.kernel_size), parts[0].dtype)
            outs = [run(i) for i in range(len(parts))]
        else:
            state = self.variable("cache", "state")
            outs, finals = [], []
            for i, p in enumerate(parts):
                prev = state.value[:, offsets[i] : offsets[i] + widths[i]] if split else state.value
                if p.shape[1] == 1:  # one token: segment ids change nothing (the history counts as its segment)
                    y, f = causal_conv1d_step(p[:, 0], prev, cut(weight, i), bias=cut(bias, i), **kw)
                    y = y[:, None]
                else:
                    y, f = run(i, initial_state=prev, return_final_state=True)
                outs.append(y)
                finals.append(f)
            state.value = jnp.concatenate(finals, axis=1) if split else finals[0]
        return outs if split else outs[0]


def canon_from_config(config: ModelConfig, position: str, name: str | None = None, *, channel_axis=None) -> Canon:
    """The Canon layer at ``position`` (a letter of ``CANON_LETTERS[config.arch]``, see the module docstring).

    ``name`` defaults to ``canon_<position>`` for ``A``-``D`` and is required for ``b`` (``q_conv1d``, ``conv1d``,
    ...); ``channel_axis`` overrides the logical axis of the channels (e.g. ``"key"``/``"value"`` for GLA's convs).
    """
    if position not in CANON_LETTERS[config.arch]:
        raise ValueError(
            f"canon_from_config: position {position!r} is not a Canon position of arch={config.arch!r} "
            f"(valid: {tuple(CANON_LETTERS[config.arch])})"
        )
    common = dict(
        channel_axis=channel_axis or _CHANNEL_AXIS[position],
        param_dtype=jnp.dtype(config.param_dtype),
        impl=config.kernel_impl,
    )
    if position == "b":
        if name is None:
            raise ValueError("canon_from_config: position 'b' needs an explicit name (e.g. 'q_conv1d', 'conv1d')")
        if config.arch == "mamba2":  # conv1d: PyTorch Conv1d default for weight and bias
            init = torch_default_init(config.conv_size)
            extra = dict(use_bias=True, kernel_init=init, bias_init=init)
        else:  # fla's ShortConvolution in the GLA5/GDN2 models: N(0, initializer_range), no bias
            extra = dict(use_bias=False, kernel_init=normal_init(config.init_std))
        return Canon(kernel_size=config.conv_size, residual=False, activation="silu", name=name, **common, **extra)
    return Canon(
        kernel_size=config.canon_kernel,
        residual=config.canon_residual,
        activation="silu" if config.canon_activation else None,
        use_bias=config.canon_bias,
        name=name or f"canon_{position.lower()}",
        **common,
    )


def canon_site(config: ModelConfig, decode: bool, fn: Callable[..., Any], position: str) -> Callable[..., Any]:
    """``fn(module, *arrays)``: the Canon layer at ``position`` (when the model has one) and what computes its input
    (the norm before Canon-A/C, the q/k norms before Canon-B; Canon-D's ``fn`` also applies the gated activation),
    lifted with ``nn.remat`` when the model has Canon at ``position``, ``position`` is in ``config.canon_recompute``
    (``"auto"``: ``"ABC"`` for Llama when the program is compiled for TPU, else none) and ``config.remat`` is
    ``"full"`` or ``"save_dots"`` (and not decoding). The backward pass then keeps only ``fn``'s inputs, which the
    model without Canon keeps too, and recomputes the Canon input and output. Call the result as ``fn``; parameter
    paths are those of the modules ``fn`` creates, as if it ran inline.
    """
    sites = config.canon_recompute
    if sites == "auto":
        sites = "ABC" if config.arch == "llama" and target_platform() == "tpu" else ""
    if config.has_canon(position) and position in sites and config.remat in ("full", "save_dots") and not decode:
        return nn.remat(fn)
    return fn
