"""The compiled train step under FSDP reduce-scatters weight gradients (deviceless TPU compilation, needs libtpu).

Every parameter is sharded over ``fsdp``; its gradient must reach each device as that device's shard through a
reduce-scatter, not as a full all-reduced copy on every device (which is what the step compiled to before the
gradients were constrained to the parameters' shardings).
"""

import pytest

pytest.importorskip("libtpu")

pytestmark = pytest.mark.compile


def _compile(**model):
    from canon_jax.train.config import config_from_dict
    from experiments.compile import compile_step
    from tests.train._util import tiny_config

    raw = tiny_config(
        {"train": "unused.jsonl", "eval": "unused.txt"},
        model={
            "hidden_size": 256,
            "num_heads": 4,
            "multiple_of": 256,
            "vocab_size": 512,
            "max_seq_len": 128,
            "dtype": "bfloat16",
            "kernel_impl": "xla",
            **model,
        },
        data={"seq_len": 128},
        mesh={"data": 1, "fsdp": -1, "tensor": 1},
    )
    return compile_step(config_from_dict(raw), "v5e:2x2", per_device_batch=2)


def test_fsdp_weight_gradients_are_reduce_scattered():
    from experiments.compile import collective_counts, collectives

    hlo = _compile(canon_set="ABCD").as_text()
    counts = collective_counts(hlo)
    # forward/backward all-gather the weights; every 2-D weight gradient is reduce-scattered to its fsdp shard
    assert counts["all-gather (weights)"] > 0, counts
    assert counts["reduce-scatter (weights)"] > 0, counts
    assert counts["all-reduce (weights)"] == 0, [c for c in collectives(hlo) if c[0] == "all-reduce"]
