"""Argument checks of the linear-recurrence ops, one set for the ops (``api``) and the Pallas kernel entry points
(``kernel``): a ValueError naming the op and the argument."""

from __future__ import annotations


def check_chunk_size(op: str, chunk_size) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive integer, got {chunk_size!r}")


def check_state(op: str, initial_state, want: tuple, names: str) -> None:
    """Raise a ValueError naming ``op`` unless ``initial_state`` is None or has shape ``want`` (``names`` its axes)."""
    if initial_state is not None and tuple(initial_state.shape) != tuple(want):
        raise ValueError(f"{op}: initial_state must be [{names}]={tuple(want)}, got {initial_state.shape}")


def check_gla(op, q, k, v, log_gate, initial_state):
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [batch, time, heads, key_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {q.shape}, got {k.shape}")
    if log_gate.shape != q.shape:
        raise ValueError(f"{op}: log_gate must have q's shape {q.shape} (per key channel), got {log_gate.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v must be [batch, time, heads, value_dim] with leading dims {q.shape[:3]}, got {v.shape}"
        )
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[-1])
    check_state(op, initial_state, want, "batch, heads, key_dim, value_dim")


def check_gdn(op, q, k, v, log_decay, beta, initial_state):
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be [batch, time, heads, key_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v must be [batch, time, heads, value_dim] with leading dims {q.shape[:3]}, got {v.shape}"
        )
    for name, a in (("log_decay", log_decay), ("beta", beta)):
        if a.shape != q.shape[:3]:
            raise ValueError(f"{op}: {name} must be [batch, time, heads]={q.shape[:3]}, got {a.shape}")
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[-1])
    check_state(op, initial_state, want, "batch, heads, key_dim, value_dim")


def check_ssd(op, x, dt, A, B, C, D, initial_state):
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be [batch, time, heads, head_dim], got shape {x.shape}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"{op}: dt must be [batch, time, heads]={(b, t, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"{op}: A must be [heads]=({h},), got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"{op}: B must be [batch, time, groups, state], got {B.shape}")
    if C.shape != B.shape:
        raise ValueError(f"{op}: C must have B's shape {B.shape}, got {C.shape}")
    g = B.shape[2]
    if h % g:
        raise ValueError(f"{op}: {g} groups must divide {h} heads")
    if D is not None and D.shape != (h,):
        raise ValueError(f"{op}: D must be [heads]=({h},), got {D.shape}")
    want = (b, h, p, B.shape[3])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(
            f"{op}: initial_state must be [batch, heads, head_dim, state]={want}, got {initial_state.shape}"
        )


def check_nonempty(op, **arrays) -> None:
    """The Pallas kernels take no empty axis."""
    for name, a in arrays.items():
        if 0 in a.shape:
            raise ValueError(f"{op}: {name} must be non-empty, got shape {a.shape}")
