"""Deviceless TPU compile: a tiny Llama train step on a v5e:2x2 mesh (FSDP 2 x tensor 2) with attention_impl="auto"
runs JAX's splash attention kernels (forward, dq and dkv backward, with segment ids) under shard_map. (At this size
splash needs slightly more temporary memory than XLA; the saving at the 1B scale is in docs/kernels.md.)"""

import pathlib

import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

pytestmark = pytest.mark.compile

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEQ, BATCH = 512, 8


@pytest.fixture(autouse=True)
def _default_precision():
    # the test session sets float32 matmul precision for its float64 oracles; Mosaic rejects it for bf16 matmuls
    with jax.default_matmul_precision("default"):
        yield


def _compile(attention_impl):
    from canon_jax import aot
    from canon_jax.train.config import load_config
    from canon_jax.train.trainer import Trainer

    target = aot.get_target("v5e:2x2")
    cfg = load_config(
        ROOT / "configs/experiments/llama_canon_1b.yaml",
        [
            "model.hidden_size=256",
            "model.num_layers=2",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.vocab_size=512",
            "model.segment_aware=true",
            f"model.attention_impl={attention_impl}",
            "model.kernel_impl=xla",
            f"model.max_seq_len={SEQ}",
            f"data.seq_len={SEQ}",
            f"train.batch_size={BATCH}",
            "mesh.fsdp=2",
            "mesh.tensor=2",
        ],
    )
    tr = Trainer(cfg, devices=target.devices)
    return tr.lower_step().compile()


def test_auto_attention_is_splash_on_tpu():
    from canon_jax import aot
    from canon_jax.ops.attention import resolve
    from canon_jax.train.sharding import MESH_AXES
    from pallas_kernels.common import target_platform

    mesh = aot.make_mesh(aot.get_target("v5e:2x2"), (1, 2, 2), MESH_AXES)
    q = jax.ShapeDtypeStruct((4, SEQ, 4, 64), jnp.bfloat16)
    with jax.set_mesh(mesh):
        assert target_platform() == "tpu" and resolve("auto", q, q) == "splash"

    splash = _compile("auto")
    text = splash.as_text()
    for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
        # once per layer (the forward again inside the rematerialised backward)
        assert text.count(kernel) >= 2, kernel


def test_auto_canon_recompute_is_abc_for_llama_on_tpu_only():
    from canon_jax import aot
    from canon_jax.config import ModelConfig
    from canon_jax.layers.canon import canon_site
    from canon_jax.train.sharding import MESH_AXES

    def fn(mdl, x):
        return x

    llama = ModelConfig(canon_set="ABCD", remat="full")
    gdn = ModelConfig(arch="gdn", canon_set="AbCD", remat="full")
    mesh = aot.make_mesh(aot.get_target("v5e:2x2"), (1, 2, 2), MESH_AXES)
    with jax.set_mesh(mesh):
        assert [canon_site(llama, False, fn, p) is fn for p in "ABCD"] == [False, False, False, True]
        assert all(canon_site(gdn, False, fn, p) is fn for p in "ABCD")  # measured no better for the linear models
        assert all(canon_site(llama, True, fn, p) is fn for p in "ABCD")  # decoding
        assert all(canon_site(llama.replace(remat="none"), False, fn, p) is fn for p in "ABCD")
        assert all(canon_site(llama.replace(canon_recompute=""), False, fn, p) is fn for p in "ABCD")
        assert canon_site(llama.replace(canon_recompute="D"), False, fn, "D") is not fn
    assert all(canon_site(llama, False, fn, p) is fn for p in "ABCD")  # no mesh: the CPU backend
