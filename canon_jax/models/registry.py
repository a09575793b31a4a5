"""Mixer table: ``config.arch`` -> the token-mixing module of a block.

A mixer is a Linen module built as ``Mixer(config, name=...)`` and called as
``mixer(x, *, positions, segment_ids, token_mask, decode) -> y`` with ``x, y: [batch, time, hidden]``.
The built-in mixers are listed statically below; :func:`register_mixer` adds (or replaces) one explicitly.
"""

from __future__ import annotations

from canon_jax.layers.attention import Attention
from canon_jax.layers.gdn import GDNMixer
from canon_jax.layers.gla import GLAMixer
from canon_jax.layers.mamba2 import Mamba2Mixer

__all__ = ["register_mixer", "get_mixer", "registered_mixers"]

_MIXERS: dict = {"llama": Attention, "gla": GLAMixer, "gdn": GDNMixer, "mamba2": Mamba2Mixer}


def register_mixer(arch: str, cls=None):
    """Registers ``cls`` as the mixer of ``arch``; usable as ``register_mixer("gla", GLA)`` or as a decorator."""

    def _register(c):
        _MIXERS[arch] = c
        return c

    return _register if cls is None else _register(cls)


def registered_mixers() -> tuple:
    return tuple(sorted(_MIXERS))


def get_mixer(arch: str):
    """The mixer class of ``arch``. Raises ``ValueError`` if there is none."""
    if arch not in _MIXERS:
        raise ValueError(
            f"arch={arch!r} has no registered mixer (registered: {registered_mixers()}); "
            f"add one with canon_jax.models.register_mixer({arch!r}, MixerClass)"
        )
    return _MIXERS[arch]
