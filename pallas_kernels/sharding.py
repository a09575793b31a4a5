"""``jax.shard_map`` wrappers: Mosaic kernels are not auto-partitioned, so under a sharded ``jax.jit`` each device
runs the kernel on its own shard. Both ops are independent across batch (and across channels for the depthwise
conv, across heads for the scan), so the forward needs no communication (``check_vma=False``: pallas_call outputs
carry no varying-axes annotation); shard_map's transpose sums the conv's weight gradient over the batch shards.

``rules`` maps the project's logical axis names to mesh axis names (or None / a tuple of names), e.g.
``{"batch": ("data", "fsdp"), "embed": "tensor", "heads": "tensor"}``; names missing from it are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.linear_scan import api as scan_api
from pallas_kernels.short_conv import api as conv_api


def _ax(rules: Mapping[str, object], name: str | None):
    return None if name is None else rules.get(name)


def short_conv_sharded(
    x,
    weight,
    *,
    mesh,
    rules: Mapping[str, object],
    channel_axis: str = "embed",
    bias=None,
    segment_ids=None,
    initial_state=None,
    **kwargs,
):
    """``short_conv`` with x ``[batch, time, channels]`` sharded as ``(rules["batch"], None, rules[channel_axis])``.

    ``channel_axis`` is the logical name of the channel dimension (``embed``, ``mlp``, ``qkv``, ...). Time is never
    sharded (the conv needs the K-1 previous tokens)."""
    b, c = _ax(rules, "batch"), _ax(rules, channel_axis)
    args, specs = [x, weight], [P(b, None, c), P(None, c)]
    opt = {
        "bias": (bias, P(c)),
        "segment_ids": (segment_ids, P(b, None)),
        "initial_state": (initial_state, P(b, c, None)),
    }
    names = [n for n, (v, _) in opt.items() if v is not None]
    args += [opt[n][0] for n in names]
    specs += [opt[n][1] for n in names]

    def local(x, w, *rest):
        return conv_api.short_conv(x, w, **dict(zip(names, rest)), **kwargs)

    return jax.shard_map(local, mesh=mesh, check_vma=False, in_specs=tuple(specs), out_specs=P(b, None, c))(*args)


def gla_sharded(q, k, v, log_gate, *, mesh, rules: Mapping[str, object], initial_state=None, **kwargs):
    """``linear_scan.gla`` with batch and heads sharded: ``[batch, time, heads, D]`` as ``(batch, None, heads,
    None)``, states ``[batch, heads, Dk, Dv]`` as ``(batch, heads, None, None)``."""
    b, h = _ax(rules, "batch"), _ax(rules, "heads")
    tok, st = P(b, None, h, None), P(b, h, None, None)
    if initial_state is None:
        fn = lambda q, k, v, g: scan_api.gla(q, k, v, g, **kwargs)
        return jax.shard_map(fn, mesh=mesh, check_vma=False, in_specs=(tok,) * 4, out_specs=(tok, st))(
            q, k, v, log_gate
        )
    fn = lambda q, k, v, g, s0: scan_api.gla(q, k, v, g, initial_state=s0, **kwargs)
    return jax.shard_map(fn, mesh=mesh, check_vma=False, in_specs=(tok,) * 4 + (st,), out_specs=(tok, st))(
        q, k, v, log_gate, initial_state
    )


def ssd_sharded(x, dt, A, B, C, D=None, *, mesh, rules: Mapping[str, object], initial_state=None, **kwargs):
    """``linear_scan.ssd`` with batch and heads sharded. With one group, B/C are replicated over the heads axis;
    with several, groups are sharded like heads (the group count must divide evenly, as heads do)."""
    b, h = _ax(rules, "batch"), _ax(rules, "heads")
    g_ax = None if B.shape[2] == 1 else h
    specs = [P(b, None, h, None), P(b, None, h), P(h), P(b, None, g_ax, None), P(b, None, g_ax, None)]
    args = [x, dt, A, B, C]
    has_d, has_s = D is not None, initial_state is not None
    if has_d:
        args.append(D)
        specs.append(P(h))
    if has_s:
        args.append(initial_state)
        specs.append(P(b, h, None, None))

    def local(x, dt, A, B, C, *rest):
        rest = list(rest)
        d = rest.pop(0) if has_d else None
        s0 = rest.pop(0) if has_s else None
        return scan_api.ssd(x, dt, A, B, C, d, initial_state=s0, **kwargs)

    return jax.shard_map(
        local, mesh=mesh, check_vma=False, in_specs=tuple(specs), out_specs=(P(b, None, h, None), P(b, h, None, None))
    )(*args)
