"""Flash attention for training and prefill: JAX's splash attention kernel on TPU, cuDNN on NVIDIA GPUs.

Both compute the same function as :func:`canon_jax.layers.attention.causal_attention` (causal softmax attention with
grouped KV heads, scale ``hd^-1/2``, optional packed-document segment ids and key mask) without keeping an
``O(T^2)`` score matrix for the backward pass.

``impl`` (``ModelConfig.attention_impl``):

* ``"auto"``: splash on TPU, cuDNN on a CUDA GPU when its shape/dtype limits allow, else ``None`` (the blocked XLA
  path). The platform is the one the program is compiled for (:func:`pallas_kernels.common.target_platform`: the
  trace-time mesh's devices, so a deviceless compile for TPU from a CPU host gets splash; else the default backend).
* ``"xla"``: ``None``.
* ``"splash"`` / ``"splash_interpret"``: the splash kernel compiled by Mosaic (TPU only) / run by the Pallas
  interpreter (any platform; tests).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (CUDA GPU only).

Under a mesh the kernels run per device through :func:`pallas_kernels.sharding.shard_map_call` (Mosaic calls are not
partitioned by XLA): batch over the mesh axes of the logical name ``"batch"``, query and KV heads over those of
``"heads"``, time and head_dim whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import ATTENTION_IMPLS, check_impl, round_up, target_platform
from pallas_kernels.sharding import shard_map_call

__all__ = ["ATTENTION_IMPLS", "resolve", "flash_attention", "splash_attention", "cudnn_attention"]

_LANES = 128  # splash tiles time in multiples of the TPU lane width
_SPLASH_BLOCK = 512
# a key that no query may attend (padding keys when a key mask is given): never equal to a query's segment id
_NO_SEGMENT = int(np.iinfo(np.int32).min)
_F32_PRECISION = ("highest", "float32", "Precision.HIGHEST", "HIGHEST")


def _platform() -> str:
    """``"tpu"``, ``"cuda"``, ``"rocm"`` or ``"cpu"`` for the devices the program is compiled for."""
    platform = target_platform()
    if platform == "gpu":  # cuDNN is NVIDIA's: ROCm only when this process itself runs on a ROCm backend
        return "rocm" if jax.default_backend() == "rocm" else "cuda"
    return platform


def cudnn_supports(q, k) -> bool:
    """cuDNN flash attention's limits (cuDNN 9): 16-bit inputs, head_dim a multiple of 8 up to 128."""
    hd = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and hd % 8 == 0 and hd <= 128


def resolve(impl: str, q, k) -> str:
    """The implementation ``impl`` stands for on the target platform: ``"xla"``, ``"splash"``,
    ``"splash_interpret"`` or ``"cudnn"``. Raises ValueError for an unknown name and NotImplementedError for a
    kernel the target platform cannot run."""
    check_impl("attention", impl, name="attention_impl")
    if impl in ("xla", "splash_interpret"):
        return impl
    platform = _platform()
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "cuda" and cudnn_supports(q, k):
            return "cudnn"
        return "xla"
    if impl == "splash" and platform != "tpu":
        raise NotImplementedError(
            f"attention_impl='splash' needs a TPU (the program is compiled for {platform!r}); "
            "use 'splash_interpret' to run the kernel in the Pallas interpreter, or 'xla'"
        )
    if impl == "cudnn":
        if platform != "cuda":
            raise NotImplementedError(
                f"attention_impl='cudnn' needs an NVIDIA GPU (the program is compiled for {platform!r}); use 'xla'"
            )
        if not cudnn_supports(q, k):
            raise NotImplementedError(
                f"attention_impl='cudnn' needs bfloat16/float16 q, k, v and head_dim a "
                f"multiple of 8 up to 128, got {q.dtype}/{k.dtype}, head_dim {q.shape[-1]}"
            )
    return impl


# ----------------------------------------------------------------------------------------------------------------------
# splash (TPU)


def _splash_kernel(heads: int, t_pad: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((t_pad, t_pad)) for _ in range(heads)])
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # built in the trace that uses it (its block tables become constants of that program; the numpy mask analysis
    # behind them is cached by jax)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, seg_q, seg_kv, *, interpret: bool, block_size: int = _SPLASH_BLOCK):
    """Splash on one device's shard: q ``[b, t, h, hd]``, k/v ``[b, t, kvh, hd]``, segment ids ``[b, t]`` or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, hd = q.shape
    if not interpret and q.dtype != jnp.float32 and str(jax.config.jax_default_matmul_precision) in _F32_PRECISION:
        raise ValueError(
            f"splash attention: Mosaic cannot compile {q.dtype} matmuls at float32 precision; unset "
            f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision!r} (or use "
            "attention_impl='xla')"
        )
    # time is padded at the end to whole blocks: causality keeps every real query off the padded keys, and the
    # padded query rows are dropped
    block = min(block_size, round_up(t, _LANES))
    t_pad = round_up(t, block)
    # the kernel takes unscaled logits: fold hd^-1/2 into q (one rounding, exact for hd = 4^n)
    q = (q.astype(jnp.float32) * (hd**-0.5)).astype(q.dtype)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, heads, t, hd]
    if t_pad != t:
        pad = ((0, 0), (0, 0), (0, t_pad - t), (0, 0))
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        if seg_q is not None:
            seg_q = jnp.pad(seg_q, ((0, 0), (0, t_pad - t)))
            seg_kv = jnp.pad(seg_kv, ((0, 0), (0, t_pad - t)), constant_values=_NO_SEGMENT)
    kernel = _splash_kernel(h, t_pad, block, interpret)
    if seg_q is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=SegmentIds(sq, skv)))(
            q, k, v, seg_q.astype(jnp.int32), seg_kv.astype(jnp.int32)
        )
    return jnp.swapaxes(out[:, :, :t], 1, 2)


def _segment_pair(b, t, segment_ids, key_valid):
    """Query and key segment ids expressing segment masking and the key mask (``None, None`` when neither)."""
    if segment_ids is None and key_valid is None:
        return None, None
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg_kv = seg if key_valid is None else jnp.where(key_valid, seg, _NO_SEGMENT)
    return seg, seg_kv


def splash_attention(
    q, k, v, *, segment_ids=None, key_valid=None, interpret: bool = False, block_size: int = _SPLASH_BLOCK
):
    """Splash attention (unsharded call; :func:`flash_attention` wraps it in ``shard_map`` under a mesh).

    Same contract as ``causal_attention``, except that a query with no allowed key (only at masked padding
    positions) gets an unspecified but finite output. ``block_size`` (a multiple of 128): the query/key tile of the
    forward and both backward kernels (smaller sequences use one tile).
    """
    if block_size % _LANES or block_size < _LANES:
        raise ValueError(f"splash_attention: block_size must be a positive multiple of {_LANES}, got {block_size}")
    b, t = q.shape[:2]
    seg_q, seg_kv = _segment_pair(b, t, segment_ids, key_valid)
    return _splash_local(q, k, v, seg_q, seg_kv, interpret=interpret, block_size=block_size)


# ----------------------------------------------------------------------------------------------------------------------
# cuDNN (NVIDIA GPU)
def cudnn_attention(q, k, v, *, segment_ids=None, key_valid=None, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` with ``is_causal`` (cuDNN skips the masked blocks).

    jax's public API exposes cuDNN's packed-document layout only through a dense mask: with segment ids or a key mask
    a boolean ``[batch, 1, T, T]`` mask is passed (cuDNN turns it into an additive bias of that size, one per layer;
    still no float32 ``[batch, heads, T, T]`` scores). ``implementation="xla"`` runs the same call through XLA (tests
    of the mask construction on CPU).
    """
    mask = None
    if segment_ids is not None or key_valid is not None:
        b, t = q.shape[:2]
        seg_q, seg_kv = _segment_pair(b, t, segment_ids, key_valid)
        mask = (seg_q[:, :, None] == seg_kv[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, scale=q.shape[-1] ** -0.5, implementation=implementation
    )


# ----------------------------------------------------------------------------------------------------------------------
# query head h reads KV head h // (H / H_kv): both head counts carry the logical name "heads" so that one resolution
# splits them alike (an indivisible count replicates both)
_TOKENS = P("batch", None, "heads", None)
_ROWS = P("batch", None)


def flash_attention(impl: str, q, k, v, *, segment_ids=None, key_valid=None):
    """Causal attention through the kernel ``impl`` selects, or ``None`` when it selects the XLA path.

    q ``[batch, time, heads, hd]``, k/v ``[batch, time, kv_heads, hd]``; ``segment_ids`` int ``[batch, time]``,
    ``key_valid`` bool ``[batch, time]`` (both optional). Returns ``[batch, time, heads, hd]`` in ``q.dtype``.
    """
    choice = resolve(impl, q, k)
    if choice == "xla":
        return None
    if choice == "cudnn":
        fn = lambda q, k, v, s, m: cudnn_attention(q, k, v, segment_ids=s, key_valid=m)
    else:
        interpret = choice == "splash_interpret"
        fn = lambda q, k, v, s, m: splash_attention(q, k, v, segment_ids=s, key_valid=m, interpret=interpret)
    return shard_map_call(fn, q, k, v, segment_ids, key_valid, in_axes=(_TOKENS,) * 3 + (_ROWS,) * 2, out_axes=_TOKENS)
