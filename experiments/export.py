"""Export a training checkpoint as a Hugging Face LlamaCanon directory (``config.json`` + ``model.safetensors``):

    canon-export --workdir runs/quickstart [--step 400] --out exported/quickstart

(or ``python -m experiments.export ...``). The default step is the newest checkpoint. Load the result with
``canon_jax.load_hf_checkpoint(DIR)`` or transformers' LlamaCanon; a run is also loaded directly with
``canon_jax.load_run(WORKDIR)``. Exit status 2 with one line on a bad path, step or architecture.
"""

from __future__ import annotations

import argparse
import sys

from experiments.cli import run_reporting_errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: _export(args))


def _export(args) -> int:
    from canon_jax.train.export import export_hf

    out = export_hf(args.workdir, args.out, args.step)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
