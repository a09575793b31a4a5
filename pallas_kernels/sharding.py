"""Kernels on a device mesh: per-device calls under ``jax.shard_map`` with specs from the logical-axis rules (the one
shard_map helper of every op's api).

Mosaic (TPU / GPU) kernels cannot be partitioned by XLA, so under a sharded ``jax.jit`` every device must run the
kernel on its own block of the inputs. :func:`shard_map_call` does that for any per-device function, taking the
mesh from the trace-time context (``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh``, which the trainer's step
sets; :func:`pallas_kernels.common.context_mesh`) and the mesh axes of each argument from logical axis names
resolved by the rules table (flax's ``nn.logical_axis_rules`` context if set, else
``canon_jax.train.sharding.LOGICAL_RULES``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import context_mesh

__all__ = ["shard_map_call", "resolve_logical_axes"]

log = logging.getLogger(__name__)


def _rules(rules):
    if rules is not None:
        return tuple(rules)
    from flax import linen as nn

    ctx = nn.get_logical_axis_rules()
    if ctx:
        return tuple(ctx)
    from canon_jax.train.sharding import LOGICAL_RULES  # local import: ops do not need the trainer otherwise

    return LOGICAL_RULES


def _names(axes) -> tuple:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def resolve_logical_axes(shapes: Sequence[tuple], logical: Sequence[P], mesh, rules=None) -> dict:
    """``{logical name: tuple of mesh axis names}`` for one call.

    Each logical name gets the mesh axes of its first rule whose axes are all free (not taken by a name of an
    earlier rule: flax's priority order) and not manual; axes of size 1 are dropped. A name's axes are then cut to
    the longest prefix whose size divides every dimension carrying that name in ``shapes`` (e.g. batch 2 on
    ``data=2, fsdp=4`` keeps ``data``), so an indivisible dimension is replicated rather than rejected. One
    resolution for all arguments keeps them consistent (a replicated batch is replicated in every argument).
    """
    usable = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
    wanted = {n for spec in logical for n in spec if n is not None}
    taken, out = set(), {}
    for name, axes in _rules(rules):
        if name not in wanted or name in out:
            continue
        names = tuple(a for a in _names(axes) if a in usable and mesh.shape[a] > 1)
        if taken.intersection(names):
            continue
        out[name] = names
        taken.update(names)
    for name in wanted:
        axes = out.get(name, ())
        dims = [d for shape, spec in zip(shapes, logical) for d, n in zip(shape, spec) if n == name]
        keep = len(axes)
        while keep and any(d % int(np.prod([mesh.shape[a] for a in axes[:keep]])) for d in dims):
            keep -= 1
        if keep < len(axes):
            log.info(
                "shard_map_call: %r (sizes %s) is not divisible by mesh axes %s; using %s",
                name,
                dims,
                axes,
                axes[:keep],
            )
        out[name] = axes[:keep]
    return out


def _mesh_spec(spec: P, resolved: dict) -> P:
    entries = []
    for n in spec:
        axes = resolved.get(n, ()) if n is not None else ()
        entries.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*entries)


def shard_map_call(fn: Callable, *args, in_axes: Sequence[P | None], out_axes, rules=None, mesh=None):
    """``fn(*args)``, run per device under ``jax.shard_map`` when a mesh is set; a plain call otherwise.

    Args:
      fn: the per-device function (e.g. a ``pallas_call`` wrapper with its own ``custom_vjp``). It receives each
        device's block of ``args`` (``None`` arguments are passed through as ``None``) and must return blocks laid
        out as ``out_axes`` says. It must not communicate: the blocks are independent (batch, heads, channels).
      *args: arrays or ``None`` (absent optional inputs).
      in_axes: one logical ``PartitionSpec`` per argument, naming each dimension by a logical axis of the rules
        table (``"batch"``, ``"heads"``, ``"channels"``, ...) or ``None`` for a dimension that is never split (time,
        head_dim, state); ``None`` for a ``None`` argument.
      out_axes: a pytree of logical ``PartitionSpec`` matching ``fn``'s output; it may only use names that appear
        in ``in_axes`` (their resolution comes from the inputs' sizes).
      rules: ``((logical name, mesh axes), ...)``; default flax's ``nn.logical_axis_rules`` context, else
        ``canon_jax.train.sharding.LOGICAL_RULES``.
      mesh: the mesh; default the trace-time context mesh (:func:`context_mesh`).

    Returns ``fn``'s output as global arrays. Gradients flow through (``fn``'s custom VJPs run per device); the
    gradient of an argument replicated over some mesh axes (a weight over the batch axes) is summed over them by
    ``shard_map``'s transpose. Without a mesh, or when every usable mesh axis has size 1, ``fn(*args)`` is called
    directly.
    """
    if len(in_axes) != len(args):
        raise ValueError(f"shard_map_call: {len(args)} arguments but {len(in_axes)} in_axes")
    mesh = context_mesh() if mesh is None else mesh
    manual = set() if mesh is None else {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
    if mesh is None or all(mesh.shape[n] == 1 for n in mesh.axis_names if n not in manual):
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]
    for i in present:
        if in_axes[i] is None or len(in_axes[i]) != np.ndim(args[i]):
            raise ValueError(
                f"shard_map_call: argument {i} has shape {np.shape(args[i])} but logical axes {in_axes[i]}"
            )
    logical = [in_axes[i] for i in present]
    resolved = resolve_logical_axes([np.shape(args[i]) for i in present], logical, mesh, rules)
    is_spec = lambda x: isinstance(x, P)
    missing = {n for s in jax.tree.leaves(out_axes, is_leaf=is_spec) for n in s if n is not None} - set(resolved)
    if missing:
        raise ValueError(f"shard_map_call: out_axes name {sorted(missing)} that no input carries")

    def local(*blocks):
        full = [None] * len(args)
        for i, b in zip(present, blocks):
            full[i] = b
        return fn(*full)

    # check_vma=False: pallas_call outputs carry no varying-axes type. shard_map's transpose then divides the
    # cotangent of an output replicated over an axis by that axis' size and sums input cotangents over the axes an
    # input is replicated on, so redundant per-device work (a replicated dimension) still gives exact gradients.
    return jax.shard_map(
        local,
        mesh=mesh,
        axis_names=frozenset(n for n in mesh.axis_names if n not in manual),
        check_vma=False,
        in_specs=tuple(_mesh_spec(s, resolved) for s in logical),
        out_specs=jax.tree.map(lambda s: _mesh_spec(s, resolved), out_axes, is_leaf=is_spec),
    )(*[args[i] for i in present])
