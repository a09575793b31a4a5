"""Run logging: ``metrics.jsonl`` (one JSON object per logged step / evaluation), TensorBoard, and the console: a tqdm
progress bar on a terminal, one plain line per logged step otherwise (a pipe or a file gets no carriage-return
frames), or with ``progress=False``.

Only process 0 writes. On resume, records with ``step`` beyond the restored step are dropped first, so the file of a
killed-and-resumed run reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import jax

__all__ = ["MetricsLogger", "read_metrics"]


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_metrics(path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (skips a torn last line)."""
    out = []
    p = pathlib.Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class MetricsLogger:
    """Writes metrics of one run into ``workdir``.

    Args:
      workdir: run directory (``metrics.jsonl`` and TensorBoard events go there).
      total_steps: for the progress bar's ETA.
      start_step: the step training resumes from; later records in an existing file are dropped.
    """

    def __init__(self, workdir, total_steps: int, start_step: int = 0, tensorboard: bool = True, progress: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.active = jax.process_index() == 0
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self.total_steps = total_steps
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                str(self.workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train", unit="step")

    def log(self, record: dict, prefix: str = "train"):
        """Append ``record`` (must contain ``step``) to metrics.jsonl and TensorBoard (scalars under ``prefix/``)."""
        if not self.active:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = rec["step"]
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, step: int, loss: float | None = None, tokens_per_s: float | None = None):
        if not self.active:
            return
        if self._bar is None:
            parts = [f"step {step}/{self.total_steps}"]
            if loss is not None:
                parts.append(f"loss {loss:.4f}")
            if tokens_per_s is not None and tokens_per_s == tokens_per_s:
                parts.append(f"{tokens_per_s:,.0f} tok/s")
            print("  ".join(parts), flush=True)
            return
        self._bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def write(self, text: str):
        """Print a line without breaking the progress bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        self._file.close()
