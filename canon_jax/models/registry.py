"""Mixer registry: ``config.arch`` -> the token-mixing module of a block.

A mixer is a Linen module built as ``Mixer(config, name=...)`` and called as
``mixer(x, *, positions, segment_ids, token_mask, decode) -> y`` with ``x, y: [batch, time, hidden]``.
``"llama"`` maps to :class:`canon_jax.layers.attention.Attention`. The linear architectures register themselves from
their own modules (``canon_jax.layers.{gla,gdn,mamba2}``) with :func:`register_mixer`; :func:`get_mixer` imports
those modules on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["register_mixer", "get_mixer", "registered_mixers"]

_MIXERS: dict = {}
# Modules that register the mixer of an architecture when imported.
_PROVIDERS = {
    "llama": "canon_jax.layers.attention",
    "gla": "canon_jax.layers.gla",
    "gdn": "canon_jax.layers.gdn",
    "mamba2": "canon_jax.layers.mamba2",
}


def register_mixer(arch: str, cls=None):
    """Registers ``cls`` as the mixer of ``arch``; usable as ``register_mixer("gla", GLA)`` or as a decorator."""

    def _register(c):
        _MIXERS[arch] = c
        return c

    return _register if cls is None else _register(cls)


def registered_mixers() -> tuple:
    return tuple(sorted(_MIXERS))


def get_mixer(arch: str):
    """The mixer class of ``arch``; imports its provider module on first use. Raises ``ValueError`` if none."""
    if arch not in _MIXERS and arch in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[arch])
        except ModuleNotFoundError as e:
            raise ValueError(f"arch={arch!r}: its mixer module {_PROVIDERS[arch]!r} is not available ({e})") from e
    if arch not in _MIXERS:
        raise ValueError(
            f"arch={arch!r} has no registered mixer (registered: {registered_mixers()}); "
            f"call canon_jax.models.register_mixer({arch!r}, MixerClass) in "
            f"{_PROVIDERS.get(arch, 'your module')}"
        )
    return _MIXERS[arch]
