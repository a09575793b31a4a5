"""Device mesh and the logical-axis -> mesh-axis rules table.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism + parameter/optimizer sharding, ZeRO-3
style) and ``tensor`` (Megatron-style model parallelism over heads / FFN width / vocabulary). The batch is split over
``("data", "fsdp")``. Parameters keep their logical axis names (``nn.with_logical_partitioning``) and
:data:`LOGICAL_RULES` maps each name to mesh axes; a name mapped to ``None`` is replicated.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "LOGICAL_AXES",
    "make_mesh",
    "logical_shardings",
    "batch_sharding",
    "maybe_initialize_distributed",
    "mesh_shape",
]

MESH_AXES = ("data", "fsdp", "tensor")

# Every logical axis name the models use. Weights are sharded over ``fsdp`` along their "input-like"
# dimension (embed) and over ``tensor`` along their "output-like" dimension (heads / mlp / vocab / ...).
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", "tensor"),
    ("conv_kernel", None),
    ("low_rank", None),
    ("state", None),
    ("value", "tensor"),
    ("key", "tensor"),
    ("layers", None),
    # Activations of per-channel (depthwise) kernels such as the Canon conv: splitting channels needs no
    # communication inside the kernel, so it is spread over ``tensor`` whatever the surrounding layout.
    ("channels", "tensor"),
)
LOGICAL_AXES = tuple(name for name, _ in LOGICAL_RULES)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``(data, fsdp, tensor)`` sizes; ``-1`` takes the remaining devices. Raises ValueError naming the axis."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: fixed axes (product {known}) do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))} "
            f"but {num_devices} devices are available"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A 3-axis ``(data, fsdp, tensor)`` mesh with Auto axis types (rule-based sharding)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _divisible_spec(spec: P, shape, mesh) -> P:
    """Drop the mesh axes of any dimension they do not divide (e.g. a 259-token vocabulary on tensor=2): that
    dimension is replicated instead of failing. Sizes that divide keep their sharding."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, axes in zip(shape, entries):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if names and dim % size:
            log.info(
                "sharding: dimension of size %d is not divisible by mesh axes %s (%d); replicating it", dim, names, size
            )
            out.append(None)
        else:
            out.append(axes)
    return P(*out)


def logical_shardings(abstract_tree, mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of boxed (logically partitioned) abstract values; unboxed leaves are replicated.

    A dimension whose size the mapped mesh axes do not divide is replicated (see :func:`_divisible_spec`).
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
    shapes = nn.meta.unbox(abstract_tree)
    fixed = jax.tree.map(
        lambda sp, a: _divisible_spec(sp, a.shape, mesh), specs, shapes, is_leaf=lambda x: isinstance(x, P)
    )
    return jax.tree.map(lambda sp: NamedSharding(mesh, sp), fixed, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh) -> NamedSharding:
    """Sharding of ``[batch, length]`` arrays: batch over (data, fsdp), length replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "OMPI_COMM_WORLD_SIZE",
)


def maybe_initialize_distributed(mesh_cfg) -> bool:
    """Call ``jax.distributed.initialize()`` for multi-host runs.

    ``mesh.distributed``: "on" always initialises (with the optional coordinator/num_processes/process_id from the
    config, else JAX's cluster auto-detection); "auto" initialises only when a cluster environment variable is
    present; "off" never does. Must run before any other JAX call touches the backend. Returns whether it ran.
    """
    mode = mesh_cfg.distributed
    if mode == "off" or (mode == "auto" and not any(v in os.environ for v in _CLUSTER_ENV)):
        return False
    kwargs = {}
    if mesh_cfg.coordinator_address:
        kwargs["coordinator_address"] = mesh_cfg.coordinator_address
    if mesh_cfg.num_processes is not None:
        kwargs["num_processes"] = mesh_cfg.num_processes
    if mesh_cfg.process_id is not None:
        kwargs["process_id"] = mesh_cfg.process_id
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True
