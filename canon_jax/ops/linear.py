"""The projections' matmul ``x @ w`` with a hand-written VJP.

Same values and dtypes as ``jnp.dot(x, w)`` (``x: [..., d]``, ``w: [d, f]``); the backward is written out as
``dx = dy @ w^T`` and ``dw = einsum("...d,...f->df", x, dy)`` (a contraction over every leading axis at once).

Why: XLA's CPU backend compiles the backward that ``jax.grad`` derives for a batched ``x @ w`` into slow code (the
weight gradient's operands go through strided transposed copies, fused into the neighbouring element-wise ops, that
run at a fraction of memory bandwidth). With this formulation the same step runs much faster on CPU — measured
fwd+bwd, ``[8, 512, 256] x [256, 768]``: one projection 56 -> 34 ms, a SwiGLU MLP 204-214 -> 111-123 ms
(docs/benchmarks.md, "Llama step"). On TPU/GPU it is the same pair of matmuls XLA would emit anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["matmul", "dot_general"]


@jax.custom_vjp
def matmul(x, w):
    """``x @ w`` for ``x: [..., d]`` and ``w: [d, f]`` (output dtype as ``jnp.dot``)."""
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dx = jnp.dot(dy, w.T.astype(dy.dtype)).astype(x.dtype)
    lead = "".join(chr(ord("a") + i) for i in range(x.ndim - 1))
    if x.shape[-1] > dy.shape[-1]:
        # A contraction over the token axes needs one operand with tokens minor, i.e. a transposed copy: XLA:CPU
        # transposes the left one, so put the narrower of x and dy there (e.g. the MLP's down projection).
        dw = jnp.einsum(f"{lead}f,{lead}d->fd", dy, x.astype(dy.dtype)).T.astype(w.dtype)
    else:
        dw = jnp.einsum(f"{lead}d,{lead}f->df", x.astype(dy.dtype), dy).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """Drop-in ``dot_general`` for ``flax.linen.Dense(dot_general=...)``: the plain projection (contract the last axis
    of ``lhs`` with the first of a 2-D ``rhs``, no batch axes, default precision) goes through :func:`matmul`,
    anything else to ``lax.dot_general`` unchanged."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (
        rhs.ndim == 2
        and tuple(lc) == (lhs.ndim - 1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
        and precision is None
        and not kwargs
        and (preferred_element_type is None or preferred_element_type == jnp.result_type(lhs, rhs))
    )
    if plain:
        return matmul(lhs, rhs)
    return lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kwargs
    )
