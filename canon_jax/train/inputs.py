"""Training inputs of a run: the ``data`` section mapped onto the synthetic-task or text pipelines."""

from __future__ import annotations

import dataclasses

from canon_jax.train.config import ConfigError, ExperimentConfig

__all__ = ["BATCH_KEYS", "data_config", "make_train_data", "data_vocab_size"]

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def data_config(cfg: ExperimentConfig):
    """Map the ``data`` section onto ``canon_jax.data.DataConfig`` (only the fields it defines)."""
    from canon_jax.data import DataConfig

    d = cfg.data
    names = {f.name for f in dataclasses.fields(DataConfig)}
    values = {
        "tasks": [{"name": t.name, "weight": t.weight, "params": dict(t.params)} for t in d.tasks],
        "seq_len": d.seq_len,
        "loss_on": d.loss_on,
        "seed": d.seed,
        "num_workers": d.num_workers,
        "shuffle_buffer": d.shuffle_buffer,
        "split_long": d.split_long,
    }
    try:
        return DataConfig(**{k: v for k, v in values.items() if k in names})
    except (ValueError, TypeError) as e:  # unknown task / parameter: name the config key
        raise ConfigError(f"data.tasks: {str(e).splitlines()[0]}") from None


def make_train_data(cfg: ExperimentConfig, *, split: str, batch_size: int, process_index: int, process_count: int):
    """The grain dataset of this process's share of every global batch: dicts of numpy arrays keyed by
    :data:`BATCH_KEYS` (``[batch_size, seq_len]`` each)."""
    if cfg.data.kind == "text" and cfg.data.text.train_tokens:
        from canon_jax.train.text_stream import make_token_dataset

        return make_token_dataset(
            cfg.data, split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import make_text_dataset

        return make_text_dataset(
            cfg.data, split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
    from canon_jax.data import make_dataset

    return make_dataset(
        data_config(cfg), split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
    )


def data_vocab_size(cfg: ExperimentConfig) -> int | None:
    """Vocabulary the data needs (None when unknown)."""
    if cfg.data.kind == "text" and cfg.data.text.train_tokens:
        from canon_jax.data.shards import TokenShards

        return TokenShards(cfg.data.text.train_tokens).vocab_size
    if cfg.data.kind == "text":
        from canon_jax.train.text_data import load_tokenizer

        return load_tokenizer(cfg.data.text.tokenizer).get_vocab_size()
    return data_config(cfg).vocab_size()
