"""Deviceless H100 compile (CUDA plugin + cuDNN, no GPU): a tiny bf16 Llama train step on a 2-GPU mesh with
attention_impl="auto" runs cuDNN flash attention (forward and backward custom calls), with packed-document segment
ids (a dense mask, see canon_jax.ops.attention.cudnn_attention) and without."""

import os
import pathlib
import re

import pytest

pytest.importorskip("jax_cuda12_plugin")
pytest.importorskip("nvidia.cudnn")


pytestmark = pytest.mark.compile

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEQ, BATCH = 256, 4


def _compile(segment_aware):
    from canon_jax import aot
    from canon_jax.train.config import load_config
    from canon_jax.train.trainer import Trainer

    if os.environ.get("JAX_PLATFORMS") != "cpu":
        pytest.skip("GPU targets need JAX_PLATFORMS=cpu (set before jax starts)")
    target = aot.get_target("h100:1x1x2")
    cfg = load_config(
        ROOT / "configs/experiments/llama_canon_1b.yaml",
        [
            "model.hidden_size=256",
            "model.num_layers=1",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.vocab_size=512",
            f"model.segment_aware={str(segment_aware).lower()}",
            "model.attention_impl=auto",
            "model.kernel_impl=xla",
            f"model.max_seq_len={SEQ}",
            f"data.seq_len={SEQ}",
            f"train.batch_size={BATCH}",
            "mesh.fsdp=2",
        ],
    )
    tr = Trainer(cfg, devices=target.devices)
    return tr.lower_step().compile().as_text()


@pytest.mark.parametrize("segment_aware", [False, True])
def test_auto_attention_is_cudnn_on_h100(segment_aware):
    targets = set(re.findall(r'custom_call_target="([^"]+)"', _compile(segment_aware)))
    # the segment mask reaches cuDNN as an additive bias: the ScaleBias variants
    fwd = "__cudnn$fmhaScaleBiasSoftmax" if segment_aware else "__cudnn$fmhaSoftmax"
    assert {fwd, fwd + "Backward"} <= targets, targets
