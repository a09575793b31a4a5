"""Train (or resume) one run: ``canon-train --config X.yaml --workdir DIR [--set k.s=v ...]``
(or ``python -m experiments.train ...``).

Re-running the same command on a workdir that holds a checkpoint resumes from it; optimizer, schedule, evaluation and
logging settings may change on resume (the changes are printed), a change to the model or the data is refused
(``--new-workdir`` trains it in a fresh DIR-1, DIR-2, ... instead; the old run is never touched). Ctrl-C or SIGTERM
saves a checkpoint at the current step (a second Ctrl-C aborts). ``--print-config`` shows the validated config and
exits. Exit status: 0 done or preempted by SIGTERM, 2 bad config / paths / workdir in use (one line on stderr),
3 training diverged, 130 stopped by Ctrl-C.

Other commands: canon-sweep (grids of runs), canon-plot (curves, heatmaps), canon-data (task samples),
canon-export (a checkpoint to a Hugging Face directory), canon-compile (ahead-of-time compilation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from canon_jax.train.config import ConfigError, config_to_dict, load_config
from experiments.cli import run_reporting_errors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        required=True,
        help="YAML config (may use `defaults:` to include presets; a relative path not found here is "
        "looked up in the shipped configs/)",
    )
    p.add_argument("--workdir", help="run directory (checkpoints, metrics.jsonl, TensorBoard); required to train")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set model.hidden_size=128 --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--new-workdir",
        action="store_true",
        help="if WORKDIR holds a run whose model/data config differs, train in the first of WORKDIR-1, "
        "WORKDIR-2, ... that is empty or holds this config's run, instead of refusing",
    )
    p.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    return p.parse_args(argv)


def _compatible_workdir(workdir: str, cfg) -> str:
    """The first of ``workdir``, ``workdir-1``, ... that holds no run or a run this config may continue."""
    from canon_jax.train.workdir import config_changes, format_change, recorded_config

    new = config_to_dict(cfg)
    base = pathlib.Path(workdir)
    first = None
    for i in range(1000):
        cand = base if i == 0 else base.with_name(f"{base.name}-{i}")
        old = recorded_config(cand) if cand.is_dir() else None
        refused = config_changes(old, new)[0] if old is not None else []
        if not refused:
            if i:
                print(
                    f"{base} holds a run with another model/data config ({format_change(first)}); training in "
                    f"{cand} instead ({base} is left untouched)",
                    flush=True,
                )
            return str(cand)
        first = first or refused[0]
    raise ConfigError(f"--workdir: no free {base}-N directory among the first 1000")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: _run(args))


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    if not args.workdir:
        raise ConfigError("--workdir: required to train")
    import jax

    from canon_jax import runtime
    from canon_jax.train.trainer import TrainingDiverged, train

    workdir = _compatible_workdir(args.workdir, cfg) if args.new_workdir else args.workdir
    runtime.print_hint(jax.default_backend())
    try:
        summary = train(cfg, workdir)
    except TrainingDiverged as e:
        print(f"training diverged: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: stopped without saving (the last checkpoint is kept)", file=sys.stderr)
        return 130
    if summary["preempted"]:
        print(
            f"stopped by {summary['preempted']} at step {summary['step']}; checkpoint saved in "
            f"{workdir}/checkpoints; run the same command to resume"
        )
        return 130 if summary["preempted"] == "SIGINT" else 0
    loss = summary["loss"]
    print(f"done: step {summary['step']}, final loss " + (f"{loss:.4f}" if loss is not None else "n/a"))
    return 0


def cli() -> None:
    """Console-script entry (``canon-train``)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
