"""Run by test_multiprocess.py: one process of a 2-process CPU cluster (``proc <id> <port>``), or the single-process
reference (``single``). Each process has 2 local CPU devices (XLA_FLAGS set by the caller)."""

import json
import pathlib
import shutil
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")
# Cross-process collectives on the CPU backend need an explicit implementation (gloo ships with jaxlib).
jax.config.update("jax_cpu_collectives_implementation", "gloo")

STEPS = 3  # the 2-process run stops (and checkpoints) after STEPS of a STEPS + 1 step schedule


def cfg_for(tmp, stop_after, **mesh):
    from canon_jax.train.config import config_from_dict
    from tests.train._util import tiny_config, write_corpus

    files = write_corpus(tmp / "corpus")  # deterministic: every process writes identical bytes to its own copy
    return config_from_dict(
        tiny_config(
            files,
            model={"max_seq_len": 32},
            data={"seq_len": 32},
            mesh=mesh,
            train={"steps": STEPS + 1, "stop_after": stop_after, "batch_size": 8},
            checkpoint={"every": STEPS, "keep": 2, "async_save": True},
        )
    )


def losses(workdir):
    recs = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "eval" not in r}


def main():
    from canon_jax.train.trainer import train

    mode, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
    if mode == "proc":
        pid, port = int(sys.argv[3]), int(sys.argv[4])
        cfg = cfg_for(
            tmp / f"proc{pid}",
            STEPS,
            data=2,
            fsdp=2,
            tensor=1,
            distributed="on",
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=pid,
        )
        summary = train(cfg, tmp / "multi")
        assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
        print(
            "RESULT " + json.dumps({"pid": jax.process_index(), "step": summary["step"], "loss": summary["loss"]}),
            flush=True,
        )
        jax.distributed.shutdown()
    else:
        devices = jax.devices()[:1]
        ref = train(
            cfg_for(tmp / "single", STEPS + 1, data=1, fsdp=1, tensor=1, distributed="off"),
            tmp / "single_run",
            devices=devices,
        )
        # resume the 2-process checkpoint (step STEPS) on one device and take one more step
        shutil.copytree(tmp / "multi", tmp / "resumed")
        res = train(
            cfg_for(tmp / "single", STEPS + 1, data=1, fsdp=1, tensor=1, distributed="off"),
            tmp / "resumed",
            devices=devices,
        )
        print(
            "RESULT "
            + json.dumps(
                {
                    "single": losses(tmp / "single_run"),
                    "multi": losses(tmp / "multi"),
                    "resumed_start": res["start_step"],
                    "resumed": losses(tmp / "resumed"),
                    "ref_step": ref["step"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
