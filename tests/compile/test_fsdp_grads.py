"""The compiled train step under FSDP reduce-scatters weight gradients (deviceless TPU and GPU compilation).

Every parameter is sharded over ``fsdp``; its gradient must reach each device as that device's shard through a
reduce-scatter, not as a full all-reduced copy on every device (which is what the step compiled to before the
gradients were constrained to the parameters' shardings). With ``scan_layers`` the layers' weight gradients are
produced inside the backward ``while`` loop, and they must be reduce-scattered there.
"""

import pytest

pytestmark = pytest.mark.compile

_TARGETS = {"tpu": ("v5e:2x2", ("libtpu",)), "gpu": ("h100:1x1x8", ("jax_cuda12_plugin", "nvidia.cuda_nvcc"))}


def _compile(target="v5e:2x2", **model):
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
    return compile_step(config_from_dict(raw), target, per_device_batch=2)


def test_fsdp_weight_gradients_are_reduce_scattered():
    pytest.importorskip("libtpu")
    from experiments.compile import collective_counts, collectives

    hlo = _compile(canon_set="ABCD").as_text()
    counts = collective_counts(hlo)
    # forward/backward all-gather the weights; every 2-D weight gradient is reduce-scattered to its fsdp shard
    assert counts["all-gather (weights)"] > 0, counts
    assert counts["reduce-scatter (weights)"] > 0, counts
    assert counts["all-reduce (weights)"] == 0, [c for c in collectives(hlo) if c[0] == "all-reduce"]


@pytest.mark.parametrize("platform", sorted(_TARGETS))
def test_scanned_layers_weight_gradients_are_reduce_scattered_inside_the_loop(platform):
    from experiments.compile import collective_counts, collectives, loop_computations

    target, modules = _TARGETS[platform]
    for module in modules:
        pytest.importorskip(module)
    hlo = _compile(target, canon_set="ABCD", scan_layers=True, remat="full").as_text()
    loops = loop_computations(hlo)
    assert loops, "the scanned stack compiled without a while loop"
    in_loops = collective_counts(hlo, loops)
    # every layer's q/k/v/o and MLP weight gradient is reduce-scattered to its shard in the backward loop body
    assert in_loops["reduce-scatter (weights)"] > 0, in_loops
    everywhere = collective_counts(hlo)
    assert everywhere["all-reduce (weights)"] == 0, [c for c in collectives(hlo) if c[0] == "all-reduce"]
