"""Export a training checkpoint as a Hugging Face LlamaCanon directory (``config.json`` + ``model.safetensors``):

    canon-export --workdir runs/quickstart [--step 400] --out exported/quickstart

(or ``python -m experiments.export ...``). The default step is the newest checkpoint. Load the result with
``canon_jax.load_hf_checkpoint(DIR)`` or transformers' LlamaCanon; a run is also loaded directly with
``canon_jax.load_run(WORKDIR)``. Exit status 2 with one line on a bad path, step or architecture.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the training run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    args = p.parse_args(argv)
    from canon_jax.train.config import ConfigError
    from canon_jax.train.export import RunError, export_hf

    try:
        out = export_hf(args.workdir, args.out, args.step)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
