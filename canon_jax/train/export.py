"""A trained run for use outside the trainer: :func:`load_run` (model and parameters of a checkpoint, for generation)
and :func:`export_hf` (a Hugging Face LlamaCanon directory, via :func:`canon_jax.interop.save_hf_checkpoint`).

Both read the config recorded with the checkpoint, restore only the parameters (not the optimizer state) onto one
device, and never write into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from canon_jax.train.config import ConfigError

__all__ = ["load_run", "export_hf", "RunError"]


class RunError(ValueError):
    """A run directory or step that cannot be loaded; the message names the path."""


def _steps(ckpt: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def load_run(workdir, step: int | None = None, **model_overrides):
    """``(model, params)`` of the checkpoint at ``step`` (default: the newest) of the run in ``workdir``.

    ``model`` is the run's ``CausalLM`` (``model_overrides`` set jax-side ``ModelConfig`` fields, e.g.
    ``dtype="float32"``); ``params`` are plain arrays on the default device, ready for ``model.apply`` and
    :func:`canon_jax.generate`.
    """
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from canon_jax.models import CausalLM
    from canon_jax.train.config import config_from_dict, model_config

    ckpt = pathlib.Path(workdir) / "checkpoints"
    if not ckpt.is_dir():
        raise RunError(f"{workdir}: no checkpoints/ directory (not a training run directory)")
    steps = _steps(ckpt)
    if not steps:
        raise RunError(f"{ckpt}: no checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise RunError(f"{ckpt}: no checkpoint at step {step}; steps there: {steps}")
    cfg_file = ckpt / str(step) / "config" / "metadata"
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{cfg_file}: unreadable recorded config ({type(e).__name__}: {e})") from None
    try:
        mc = model_config(config_from_dict(raw))
    except ConfigError as e:
        raise RunError(f"{cfg_file}: {e}") from None
    if model_overrides:
        mc = dataclasses.replace(mc, **model_overrides)
    model = CausalLM(mc)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nn.meta.unbox(boxed))
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": target})
    try:
        with ocp.PyTreeCheckpointer() as ck:
            restored = ck.restore(
                ckpt / str(step) / "state",
                args=ocp.args.PyTreeRestore(item={"params": target}, restore_args=restore_args, partial_restore=True),
            )
    except Exception as e:  # noqa: BLE001 - report the path, whatever orbax raised
        raise RunError(
            f"{ckpt / str(step)}: cannot restore the parameters ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return model, restored["params"]


def export_hf(workdir, out, step: int | None = None) -> pathlib.Path:
    """Write the checkpoint at ``step`` (default: newest) of the run in ``workdir`` as a Hugging Face LlamaCanon
    directory ``out`` (``config.json`` + ``model.safetensors``). ``out`` must not exist or be empty."""
    from canon_jax.interop import save_hf_checkpoint

    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} already exists and is not an empty directory; choose a new one")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the folder {out.parent} does not exist")
    model, params = load_run(workdir, step)
    if model.config.arch != "llama":
        raise ConfigError(f"model.arch: {model.config.arch!r} has no Hugging Face LlamaCanon form (only 'llama')")
    save_hf_checkpoint(model, params, str(out))
    return out
