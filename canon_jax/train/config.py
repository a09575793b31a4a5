"""Experiment configuration: YAML files validated into typed dataclasses (omegaconf structured configs).

One :class:`ExperimentConfig` per run, with one section per concern::

    model:      every field of canon_jax.config.ModelConfig (the schema is derived from it, not duplicated)
    data:       synthetic task mix (-> canon_jax.data.DataConfig) or real text (-> canon_jax.train.text_data)
    optim:      AdamW + warmup/cosine schedule + clipping + z-loss
    train:      steps, global batch, gradient accumulation, seed
    mesh:       data / fsdp / tensor axis sizes (-1 = the rest), multi-host initialisation
    checkpoint: orbax CheckpointManager settings
    eval:       periodic evaluation with canon_jax.eval.evaluate
    logging:    metrics.jsonl / TensorBoard / progress bar

Composition: a YAML file may start with ``defaults: [relative/or/configs-root/path.yaml, ...]``; those files are
loaded first (recursively, in order) and the file's own keys are merged on top. ``--set key.sub=value`` overrides are
applied last. Every unknown key, wrong type or impossible value raises :class:`ConfigError` with a one-line message
naming the dotted key (and the valid keys/choices) before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from canon_jax.config import ModelConfig

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "DataSection",
    "TextDataSection",
    "TaskEntry",
    "OptimSection",
    "TrainSection",
    "MeshSection",
    "CheckpointSection",
    "EvalSection",
    "LoggingSection",
    "ModelSection",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "model_config",
    "CONFIGS_ROOT",
    "check_sample_lengths",
]


def _configs_root() -> pathlib.Path:
    """``configs/`` of a source checkout (or editable install); an installed package ships it as the package data
    ``canon_jax/configs`` (setup.py maps it there)."""
    package = pathlib.Path(__file__).resolve().parents[1]
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return package / "configs"


CONFIGS_ROOT = _configs_root()


class ConfigError(ValueError):
    """A bad experiment configuration; the message is one line and names the dotted key."""


# ------------------------------------------------------------------------------------------------------------------
# Schema. The model section is generated from ModelConfig's own fields so the two can never drift apart; it is a
# mutable twin (omegaconf needs to write into it) and validation is delegated to ModelConfig.__post_init__.
def _model_section_cls():
    specs = []
    for f in dataclasses.fields(ModelConfig):
        tp = typing.get_type_hints(ModelConfig)[f.name]
        specs.append((f.name, tp, field(default=f.default)))
    cls = dataclasses.make_dataclass("ModelSection", specs)
    cls.__module__ = __name__
    cls.__doc__ = "Mutable twin of canon_jax.config.ModelConfig used as the YAML schema of the model section."
    return cls


ModelSection = _model_section_cls()


@dataclass
class TaskEntry:
    """One synthetic task of a mix: ``name`` (depo1, depo2, brevo1, brevo2, capo, mano, lano), sampling ``weight``
    and generator ``params`` (checked by the data package)."""

    name: str = MISSING
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextDataSection:
    """Real-text pretraining input (see :mod:`canon_jax.train.text_data`)."""

    train_files: list[str] = field(default_factory=list)  # files or glob patterns (.txt, .jsonl, .parquet)
    eval_files: list[str] = field(default_factory=list)
    # pre-tokenised corpus (python -m canon_jax.data tokenize), streamed from disk instead of train_files/eval_files
    train_tokens: str | None = None  # token directory
    eval_tokens: str | None = None  # token directory of the validation split
    eval_fraction: float = 0.0  # or: hold out this fraction of train_tokens' windows (the last ones) for validation
    document_boundaries: bool = True  # segment ids / positions per document (False: one segment per window)
    shuffle: bool = True  # global window shuffle, reshuffled each epoch (train split)
    tokenizer: str | None = None  # path to a Hugging Face tokenizers JSON; None = built-in byte-level tokenizer
    text_field: str = "text"  # field holding the document in .jsonl / Parquet rows
    txt_mode: str = "file"  # a .txt file is one document ("file"), one per blank-line paragraph, or one per "line"
    bos_token: str | None = None  # None = detect (<bos>, <s>, <|begin_of_text|>, ...)
    eos_token: str | None = None  # None = detect (<eos>, </s>, <|end_of_text|>, <|endoftext|>, ...)
    add_bos: bool = True
    add_eos: bool = True
    eval_batches: int = 8  # held-out batches for the validation loss


@dataclass
class DataSection:
    kind: str = "synthetic"  # "synthetic" (task mix) or "text"
    seq_len: int = 512
    seed: int = 0
    num_workers: int = 0
    # synthetic
    tasks: list[TaskEntry] = field(default_factory=list)
    loss_on: str = "answer"  # "answer" (the paper's default: loss on answer tokens) or "all"
    shuffle_buffer: int = 4096  # index windows shuffled together (0 = no shuffle)
    split_long: bool = False  # cut samples longer than seq_len into windows instead of failing
    # real text
    text: TextDataSection = field(default_factory=TextDataSection)


@dataclass
class OptimSection:
    lr: float = 3e-3
    lr_min_ratio: float = 0.01  # cosine ends at lr_min_ratio * lr (the official recipe: 0.01)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (the official recipe) or "constant" (after warmup)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay: str = "all"  # "all" parameters (official recipes) or "no_norm_bias_embed"
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    z_loss: str = "none"  # "none" | "official" | "palm" (canon_jax.losses.cross_entropy)
    z_loss_weight: float = 1e-4


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 32  # global batch in sequences (all processes, before accumulation split)
    grad_accum: int = 1  # micro-batches per step (batch_size must be divisible by it)
    # time steps per chunk of the training/eval loss (canon_jax.losses.chunked_cross_entropy): the float32
    # [batch, time, vocab] logits are never materialised; 0 = compute the full logits (canon_jax.losses.cross_entropy)
    loss_chunk_size: int = 512
    seed: int = 0  # parameter init seed
    log_every: int = 10
    stop_after: int | None = None  # stop early (but keep the schedule of `steps`): for smoke tests/benchmarks
    peak_flops_per_device: float | None = None  # for MFU; None = look up a known accelerator, else no MFU


@dataclass
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: str = "auto"  # "auto" (initialise when a cluster env is detected), "on" or "off"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class CheckpointSection:
    enabled: bool = True
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclass
class EvalSection:
    every: int = 0  # 0 = only at the end (if at_end)
    at_end: bool = True
    tasks: list[TaskEntry] = field(default_factory=list)  # empty = the training tasks
    num_samples: int = 64
    batch_size: int = 16
    seed: int = 1234


@dataclass
class LoggingSection:
    tensorboard: bool = True
    progress: bool = True


@dataclass
class ExperimentConfig:
    name: str = "run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# ------------------------------------------------------------------------------------------------------------------
_CHOICES = {
    "data.kind": ("synthetic", "text"),
    "data.loss_on": ("answer", "all"),
    "data.text.txt_mode": ("file", "paragraph", "line"),
    "optim.schedule": ("cosine", "constant"),
    "optim.decay": ("all", "no_norm_bias_embed"),
    "optim.z_loss": ("none", "official", "palm"),
    "mesh.distributed": ("auto", "on", "off"),
}


def _check_keys(raw: Any, cls: Any, path: str):
    """Refuse unknown keys with the dotted path and the valid keys (before omegaconf sees them)."""
    if not dataclasses.is_dataclass(cls):
        return
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path or '<root>'}: expected a mapping with keys "
            f"{sorted(f.name for f in dataclasses.fields(cls))}, got {raw!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in raw.items():
        key = f"{path}.{k}" if path else str(k)
        if k not in names:
            import difflib

            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{key}: unknown key{hint}; valid keys: {sorted(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _check_keys(v, tp, key)
        elif typing.get_origin(tp) in (list, list) and v is not None:
            (item_tp,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item_tp):
                if not isinstance(v, (list, tuple)):
                    raise ConfigError(f"{key}: expected a list, got {v!r}")
                for i, item in enumerate(v):
                    _check_keys(item, item_tp, f"{key}[{i}]")


def _oc_error(e: Exception, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or "<root>"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{prefix}{key}: {msg}")


def _find_config(path: pathlib.Path) -> pathlib.Path:
    """``path`` itself, else (a relative path run from another directory) the same file under the shipped configs:
    ``configs/quickstart.yaml`` and ``quickstart.yaml`` both name ``CONFIGS_ROOT/quickstart.yaml``."""
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = CONFIGS_ROOT.joinpath(*parts) if parts else CONFIGS_ROOT
    return shipped if shipped.is_file() else path


def _load_yaml(path: pathlib.Path, stack: tuple = ()) -> dict:
    """Load one YAML file and, first, the files named in its ``defaults:`` list (recursively)."""
    path = _find_config(pathlib.Path(path))
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path} (nor under {CONFIGS_ROOT})")
    if path.resolve() in stack:
        raise ConfigError(f"defaults: include cycle through {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    defaults = raw.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    merged = OmegaConf.create({})
    for ref in defaults:
        cand = [path.parent / ref, CONFIGS_ROOT / ref]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: defaults entry {ref!r} not found (looked in {path.parent} and {CONFIGS_ROOT})")
        merged = OmegaConf.merge(merged, OmegaConf.create(_load_yaml(found, stack + (path.resolve(),))))
    merged = OmegaConf.merge(merged, OmegaConf.create(raw))
    return OmegaConf.to_container(merged)


def _parse_overrides(overrides) -> dict:
    out = OmegaConf.create({})
    for ov in overrides or ():
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.sub=value")
        k, v = ov.split("=", 1)
        k = k.strip()
        if not k or any(not part for part in k.split(".")):
            raise ConfigError(f"override {ov!r}: bad key {k!r}")
        try:
            val = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            val = v
        node = {}
        cur = node
        parts = k.split(".")
        for p in parts[:-1]:
            cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = val
        out = OmegaConf.merge(out, OmegaConf.create(node))
    return OmegaConf.to_container(out)


def config_from_dict(raw: dict, overrides=()) -> ExperimentConfig:
    """Validate a raw nested dict (+ dotted overrides) into an :class:`ExperimentConfig` or raise ConfigError."""
    raw = dict(raw or {})
    raw.pop("defaults", None)
    over = _parse_overrides(overrides)
    _check_keys(raw, ExperimentConfig, "")
    _check_keys(over, ExperimentConfig, "")
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(raw), OmegaConf.create(over))
        cfg = OmegaConf.to_object(merged)
    except (
        oc_errors.ValidationError,
        oc_errors.ConfigKeyError,
        oc_errors.MissingMandatoryValue,
        oc_errors.ConfigTypeError,
    ) as e:
        raise _oc_error(e) from None
    validate(cfg)
    return cfg


def load_config(path, overrides=()) -> ExperimentConfig:
    """Load ``path`` (with its ``defaults:``), apply ``key.sub=value`` overrides, validate. Raises ConfigError."""
    return config_from_dict(_load_yaml(pathlib.Path(path)), overrides)


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config(cfg: ExperimentConfig) -> ModelConfig:
    return ModelConfig(**dataclasses.asdict(cfg.model))


# ------------------------------------------------------------------------------------------------------------------
def _get(cfg, dotted):
    obj = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: ExperimentConfig) -> None:
    """Semantic checks (choices, ranges, cross-field constraints). Raises ConfigError naming the key."""
    try:
        mc = model_config(cfg)
    except ValueError as e:  # ModelConfig names the field: "ModelConfig.<field>: ..."
        msg = str(e).replace("ModelConfig.", "model.", 1)
        raise ConfigError(msg) from None
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}: {v!r} is not a valid choice; choose one of {list(choices)}")

    def positive(key, allow_zero=False):
        v = _get(cfg, key)
        if v is None or (v < 0 if allow_zero else v <= 0) or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for key in (
        "train.steps",
        "train.batch_size",
        "train.grad_accum",
        "train.log_every",
        "data.seq_len",
        "optim.lr",
        "optim.eps",
        "checkpoint.every",
        "checkpoint.keep",
        "eval.num_samples",
        "eval.batch_size",
    ):
        positive(key)
    for key in (
        "optim.warmup_steps",
        "optim.weight_decay",
        "optim.grad_clip",
        "optim.z_loss_weight",
        "optim.lr_min_ratio",
        "eval.every",
        "data.num_workers",
        "data.shuffle_buffer",
        "train.loss_chunk_size",
    ):
        positive(key, allow_zero=True)
    for key in ("optim.b1", "optim.b2"):
        v = _get(cfg, key)
        if not 0 <= v < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {v!r}")
    if cfg.optim.lr_min_ratio > 1:
        raise ConfigError(f"optim.lr_min_ratio: must be in [0, 1], got {cfg.optim.lr_min_ratio!r}")
    if cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.steps {cfg.train.steps}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.grad_accum: {cfg.train.grad_accum} does not divide train.batch_size {cfg.train.batch_size}"
        )
    if cfg.train.stop_after is not None and not 0 < cfg.train.stop_after <= cfg.train.steps:
        raise ConfigError(
            f"train.stop_after: must be in [1, train.steps={cfg.train.steps}], got {cfg.train.stop_after}"
        )
    if cfg.train.peak_flops_per_device is not None:
        positive("train.peak_flops_per_device")
    for ax in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, ax)
        if v != -1 and v < 1:
            raise ConfigError(f"mesh.{ax}: must be a positive size or -1 (= the remaining devices), got {v}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    if cfg.data.kind == "synthetic":
        if not cfg.data.tasks:
            raise ConfigError("data.tasks: a synthetic run needs at least one task (name, weight, params)")
        for i, t in enumerate(cfg.data.tasks):
            if not t.weight > 0:
                raise ConfigError(f"data.tasks[{i}].weight: must be > 0, got {t.weight}")
        _check_tasks("data.tasks", cfg.data.tasks)
        _check_tasks("eval.tasks", cfg.eval.tasks)
    else:
        t = cfg.data.text
        if t.train_tokens and t.train_files:
            raise ConfigError(
                "data.text.train_tokens: set either train_tokens (a token directory) or train_files, not both"
            )
        if not t.train_files and not t.train_tokens:
            raise ConfigError(
                "data.text.train_files: a text run needs at least one file or glob (or "
                "data.text.train_tokens, a token directory)"
            )
        if not 0.0 <= t.eval_fraction < 1.0:
            raise ConfigError(f"data.text.eval_fraction: must be in [0, 1), got {t.eval_fraction!r}")
        if t.eval_fraction and not t.train_tokens:
            raise ConfigError("data.text.eval_fraction: only applies to data.text.train_tokens")
        if t.eval_fraction and t.eval_tokens:
            raise ConfigError("data.text.eval_fraction: set either eval_fraction or eval_tokens, not both")
        if t.eval_tokens and not t.train_tokens:
            raise ConfigError("data.text.eval_tokens: needs data.text.train_tokens (use eval_files with train_files)")
        if t.train_tokens and not (t.eval_tokens or t.eval_fraction) and (cfg.eval.every or cfg.eval.at_end):
            raise ConfigError(
                "data.text.eval_tokens: evaluation is on (eval.every / eval.at_end) but there is no "
                "validation split; set data.text.eval_tokens or data.text.eval_fraction, or turn "
                "evaluation off"
            )
    if cfg.data.seq_len > mc.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len {mc.max_seq_len}")


def check_batch_divides_mesh(cfg: ExperimentConfig, mesh_shape: dict) -> None:
    """The global batch (and each of its ``grad_accum`` micro-batches) must split evenly over the data-parallel
    devices ``mesh.data * mesh.fsdp``. Raises ConfigError naming the keys and a setting that works."""
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    data, fsdp, tensor = (int(mesh_shape[a]) for a in ("data", "fsdp", "tensor"))
    dp = data * fsdp
    if (b // accum) % dp == 0:
        return
    n = dp * tensor
    fixes = [f"train.batch_size={-(-b // (dp * accum)) * dp * accum}"]
    smaller_accum = [a for a in range(accum - 1, 0, -1) if b % a == 0 and (b // a) % dp == 0]
    if smaller_accum:
        fixes.append(f"train.grad_accum={smaller_accum[0]}")
    # the most FSDP ways that divide the micro-batch (validate() made it whole), the other devices tensor-parallel
    f = max(d for d in range(1, n + 1) if n % d == 0 and (b // accum) % d == 0)
    fixes.append(f"mesh.data=1 mesh.fsdp={f} mesh.tensor={n // f}")
    what = f"{b}" + (f" / grad_accum {accum} = {b // accum} sequences per micro-batch" if accum > 1 else "")
    raise ConfigError(
        f"train.batch_size: {what} is not divisible by the data-parallel size mesh.data*mesh.fsdp = "
        f"{data}*{fsdp} = {dp} (on {n} devices); set " + ", or ".join(fixes)
    )


def _check_tasks(key: str, entries) -> None:
    """Build every task of a mix (name and generator parameters are checked by the task itself)."""
    from canon_jax.data import base
    from canon_jax.data.vocab import Vocabulary

    for i, t in enumerate(entries):
        if t.name not in base.TASK_NAMES:
            raise ConfigError(f"{key}[{i}].name: unknown task {t.name!r}; valid tasks: {list(base.TASK_NAMES)}")
        try:
            base.get_task(t.name, **dict(t.params))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}[{i}].params: {' '.join(str(e).split())}") from None
    if entries:
        try:
            Vocabulary([(t.name, dict(t.params)) for t in entries])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {' '.join(str(e).split())}") from None


def check_sample_lengths(cfg: ExperimentConfig, num: int = 256) -> None:
    """ConfigError if a training sample does not fit ``data.seq_len`` (synthetic data without ``split_long``).

    The tasks have no closed-form length bound, so the first ``num`` samples of every task's training stream (for
    this data seed) are generated and measured: a window shorter than the longest of them fails here, before training.
    """
    if cfg.data.kind != "synthetic" or cfg.data.split_long:
        return
    from canon_jax.data.vocab import Vocabulary

    vocab = Vocabulary([(t.name, dict(t.params)) for t in cfg.data.tasks])
    for i, t in enumerate(cfg.data.tasks):
        task = vocab.task(t.name, **dict(t.params))
        longest = max(len(task.sample(j, "train", cfg.data.seed)) for j in range(num))
        if longest > cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {cfg.data.seq_len} is shorter than a {task.name} sample (data.tasks[{i}]: "
                f"{longest} tokens, the longest of its first {num}); set data.seq_len >= {longest} (and "
                f"model.max_seq_len), or data.split_long: true"
            )
