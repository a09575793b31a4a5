"""A multi-shard LlamaCanon checkpoint loaded straight onto an 8-device mesh (subprocess): equal to the single-host
load, laid out by the logical-axis rules, and every device callback reads only its own slice."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from canon_jax.interop import CheckpointError, load_hf_checkpoint, load_hf_checkpoint_sharded

ROOT = pathlib.Path(__file__).parents[2]


def write_sharded(src: pathlib.Path, dst: pathlib.Path, n_shards: int = 3) -> dict:
    """Re-save a single-file checkpoint as ``n_shards`` files plus ``model.safetensors.index.json`` (HF layout)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = int(sum(t.nbytes for t in tensors.values()))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return tensors


@pytest.fixture()
def sharded(refs_dir, tmp_path):
    write_sharded(refs_dir / "llama_canon" / "canon_abcd", tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.multidevice
def test_multi_shard_checkpoint_onto_8_device_mesh(sharded):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-m", "tests.interop._sharded_load_worker", str(sharded)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for key, res in out.items():
        assert res["equal"] and res["layout"] and res["logits_equal"], key
        assert any("fsdp" in s and "tensor" in s for s in res["specs"].values()), res["specs"]
        need = res["need"]
        assert {name for name, _, _ in res["reads"]} == set(need)
        for name, size, _full in res["reads"]:  # each read is exactly one device's slice
            assert size == need[name], (key, name, size, need[name])
        assert sum(size < full for _, size, full in res["reads"]) > len(res["reads"]) // 2, key


def test_single_device_and_errors(sharded, refs_dir):
    import jax

    from canon_jax.train import sharding as shd
    from canon_jax.train.config import MeshSection

    mesh = shd.make_mesh(MeshSection(data=1), jax.devices()[:1])
    _, got = load_hf_checkpoint_sharded(str(sharded), mesh)
    _, want = load_hf_checkpoint(str(refs_dir / "llama_canon" / "canon_abcd"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00002-of-00003.safetensors"  # points at a shard without it
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {first}: not in shard"):
        load_hf_checkpoint_sharded(str(sharded), mesh)
    del index["weight_map"][first]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_hf_checkpoint_sharded(str(sharded), mesh)
    (sharded / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_hf_checkpoint_sharded(str(sharded), mesh)
