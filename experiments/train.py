"""Train (or resume) one run: ``python -m experiments.train --config configs/X.yaml --workdir DIR [--set k.s=v ...]``.

Re-running the same command on a workdir that holds a checkpoint resumes from it. ``--print-config`` shows the
validated config and exits (nothing is compiled). A bad config exits with status 2 and a one-line message.
"""
from __future__ import annotations

if __name__ == "__main__":  # before anything else: may restart the process once (canon_jax/runtime.py)
    from canon_jax.runtime import use_malloc_hugepages
    use_malloc_hugepages()

import argparse
import json
import sys

from canon_jax.train.config import ConfigError, config_to_dict, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (may use `defaults:` to include presets)")
    p.add_argument("--workdir", help="run directory (checkpoints, metrics.jsonl, TensorBoard); required to train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set model.hidden_size=128 --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    if not args.workdir:
        print("error: --workdir is required to train", file=sys.stderr)
        return 2
    from canon_jax.train.trainer import TrainingDiverged, train

    try:
        summary = train(cfg, args.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"training diverged: {e}", file=sys.stderr)
        return 3
    if summary["preempted"]:
        print(f"preempted at step {summary['step']}; checkpoint saved in {args.workdir}/checkpoints")
    else:
        print(f"done: step {summary['step']}, final loss {summary['loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
