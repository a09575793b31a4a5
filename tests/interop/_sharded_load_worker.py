"""Run with 8 simulated CPU devices: load a multi-shard LlamaCanon directory onto a (data 2, fsdp 2, tensor 2) mesh
and compare with the single-host load; record which slices the device callbacks read. Prints ``RESULT {json}``."""

import json
import sys

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from canon_jax.interop import hf
from canon_jax.train import sharding as shd
from canon_jax.train.config import MeshSection


def main(path):
    assert jax.device_count() == 8
    reads = []
    real = hf._SliceReader.read

    def recording(self, name, slices):
        out = real(self, name, slices)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    hf._SliceReader.read = recording
    mesh = shd.make_mesh(MeshSection(data=2, fsdp=2, tensor=2))
    result = {}
    for scan in (False, True):
        reads.clear()
        model, params = hf.load_hf_checkpoint_sharded(path, mesh, scan_layers=scan)
        _, ref = hf.load_hf_checkpoint(path, scan_layers=scan)
        got, want = flatten_dict(params), flatten_dict(ref)
        equal = sorted(got) == sorted(want) and all(
            np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want
        )
        specs = {"/".join(k): str(v.sharding.spec) for k, v in got.items()}
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
        want_sh = flatten_dict(shd.logical_shardings(abstract, mesh))
        layout = all(got[k].sharding.is_equivalent_to(want_sh[k], got[k].ndim) for k in got)
        ids = np.arange(12, dtype=np.int32)[None] % model.config.vocab_size
        logits_equal = bool(
            np.allclose(
                np.asarray(jax.jit(model.apply)({"params": params}, ids)),
                np.asarray(model.apply({"params": ref}, ids)),
                atol=1e-5,
            )
        )
        # the elements one device needs of each HF tensor (its shard of our parameter; one layer of a stacked one)
        need = {}
        cfg = model.config
        for hf_name, (p, _) in hf._global_map(cfg).items():
            need[hf_name] = int(np.prod(want_sh[p].shard_shape(got[p].shape)))
        for name, (p, _) in hf._layer_map(cfg).items():
            for i in range(cfg.num_layers):
                key = ("layers",) + p if scan else (f"layers_{i}",) + p
                shard = want_sh[key].shard_shape(got[key].shape)
                need[f"model.layers.{i}.{name}"] = int(np.prod(shard[1:] if scan else shard))
        result[f"scan={scan}"] = {
            "equal": equal,
            "layout": layout,
            "specs": specs,
            "logits_equal": logits_equal,
            "reads": reads[:],
            "need": need,
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
