"""Packing invariants and the grain pipeline: shapes, masks, sharding, mixing, exact resume, worker determinism."""

import json
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
import scipy.stats

from canon_jax.data import DataConfig, SampleTooLongError, TaskSpec, make_dataset, make_sample_dataset, pack_samples
from canon_jax.data.base import PAD


def _random_samples(rng, count, max_len):
    out = []
    for _ in range(count):
        n = int(rng.integers(2, max_len + 1))
        toks = rng.integers(6, 50, n).astype(np.int32)
        toks[0] = 1
        out.append({"tokens": toks, "labels": (rng.random(n) < 0.4).astype(np.int8)})
    return out


def _expected_mask(window_tokens_labels, seq_len, loss_on):
    """Loop reference: mask[t] = 1 iff t, t+1 in the same sample and (label[t+1] == 1 or loss_on == 'all')."""
    mask = np.zeros(seq_len, np.float32)
    t = 0
    for toks, labs in window_tokens_labels:
        for j in range(len(toks) - 1):
            if loss_on == "all" or labs[j + 1] == 1:
                mask[t + j] = 1.0
        t += len(toks)
    return mask


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_pack_samples_no_token_lost_and_masks_aligned(loss_on):
    rng = np.random.default_rng(0)
    L = 64
    samples = _random_samples(rng, 60, L)
    windows = pack_samples(samples, L, loss_on=loss_on)
    k = 0
    for w in windows:
        chex.assert_shape([w["inputs"], w["targets"], w["loss_mask"], w["segment_ids"], w["positions"]], (L,))
        assert w["loss_mask"].dtype == np.float32 and w["inputs"].dtype == np.int32
        segs = w["segment_ids"]
        nseg = int(segs.max())
        assert nseg >= 1
        used = []
        for sid in range(1, nseg + 1):
            idx = np.nonzero(segs == sid)[0]
            assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
            s = samples[k]
            assert np.array_equal(w["inputs"][idx], s["tokens"])  # in order, nothing lost or duplicated
            assert np.array_equal(w["positions"][idx], np.arange(len(idx)))
            used.append((s["tokens"], s["labels"]))
            k += 1
        end = sum(len(u[0]) for u in used)
        assert (segs[end:] == 0).all() and (w["inputs"][end:] == PAD).all()
        assert np.array_equal(w["targets"][:-1], w["inputs"][1:]) and w["targets"][-1] == PAD
        np.testing.assert_array_equal(w["loss_mask"], _expected_mask(used, L, loss_on))
        # greedy: the next sample would not have fit
        if k < len(samples):
            assert end + len(samples[k]["tokens"]) > L
    assert k == len(samples)


def test_too_long_sample_error_and_split():
    s = {"tokens": np.arange(1, 21, dtype=np.int32), "labels": np.ones(20, np.int8)}
    with pytest.raises(SampleTooLongError, match="length 20 .* window of length 8"):
        pack_samples([s], 8)
    ws = pack_samples([s], 8, split_long=True, loss_on="all")
    assert len(ws) == 3
    toks = np.concatenate([w["inputs"][w["segment_ids"] > 0] for w in ws])
    pos = np.concatenate([w["positions"][w["segment_ids"] > 0] for w in ws])
    assert np.array_equal(toks, s["tokens"]) and np.array_equal(pos, np.arange(20))
    assert ws[0]["loss_mask"].sum() == 7  # the cut loses the one target across the window boundary


def _cfg(**kw):
    base = dict(
        tasks=[
            TaskSpec("depo1", 1.0, {"N": 20, "K": 4}),
            TaskSpec("mano", 2.0, {"L": 4}),
            TaskSpec("brevo1", 1.0, {"N": 12}),
        ],
        seq_len=256,
        seed=3,
        shuffle_buffer=64,
    )
    base.update(kw)
    return DataConfig(**base)


def test_pipeline_batches_match_packing_of_the_sample_stream():
    cfg = _cfg()
    it = iter(make_dataset(cfg, split="train", batch_size=3))
    batches = [next(it) for _ in range(3)]
    for b in batches:
        chex.assert_shape([b[k] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")], (3, 256))
        assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    src = make_sample_dataset(cfg, split="train")
    ref = pack_samples([src[j] for j in range(120)], 256)
    for r in range(9):
        got = {k: v[r % 3] for k, v in batches[r // 3].items()}
        for k in got:
            np.testing.assert_array_equal(got[k], ref[r][k])
    v = cfg.vocabulary()
    assert batches[0]["inputs"].max() < v.size


def test_pipeline_resume_is_exact():
    cfg = _cfg()
    ds = make_dataset(cfg, split="train", batch_size=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it2 = iter(make_dataset(cfg, split="train", batch_size=2))
    it2.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip (grain checkpoints)
    again = [next(it2) for _ in range(3)]
    for a, b in zip(after, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert state["pending"], "the state should carry the sample that did not fit (resume is not trivial)"
    assert state["parent"]["consumed"], "the state should be inside a read chunk (resume is not trivial)"


def test_read_chunk_does_not_change_batches_and_getitems_matches_getitem():
    ref = [next(it) for it in [iter(make_dataset(_cfg(read_chunk=1), split="train", batch_size=2))] for _ in range(4)]
    for chunk in (7, 64):
        it = iter(make_dataset(_cfg(read_chunk=chunk), split="train", batch_size=2))
        for a in ref:
            b = next(it)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # the batched read (vectorised Mano, blocked Lano) equals element-wise reads, in any index order
    cfg = _cfg(
        tasks=[
            TaskSpec("mano", 2.0, {"L": 5}),
            TaskSpec("lano", 1.0, {"cfg": "cfg3b"}),
            TaskSpec("depo1", 1.0, {"N": 10, "K": 4}),
        ],
        shuffle_buffer=0,
    )
    ds = make_sample_dataset(cfg, split="train")
    idx = [40, 3, 2**40 + 1, 0, 17, 3] + list(range(1000, 1400, 2))  # > 128 Mano indices: vectorised call
    got = ds._getitems(idx)
    fresh = make_sample_dataset(cfg, split="train")
    for j, g in zip(idx, got):
        e = fresh[j]
        assert np.array_equal(g["tokens"], e["tokens"]) and np.array_equal(g["labels"], e["labels"]), j
    with pytest.raises(ValueError, match="read_chunk"):
        _cfg(read_chunk=0)


def test_process_sharding_partitions_the_stream():
    cfg = _cfg()
    full = make_sample_dataset(cfg, split="train")
    shards = [make_sample_dataset(cfg, split="train", process_index=p, process_count=2) for p in range(2)]
    for j in range(20):
        p, m = j % 2, j // 2
        np.testing.assert_array_equal(shards[p][m]["tokens"], full[j]["tokens"])
    with pytest.raises(ValueError, match="process_index"):
        make_sample_dataset(cfg, split="train", process_index=2, process_count=2)


def test_task_stream_is_index_addressable():
    from canon_jax.data import get_task, task_dataset

    t = get_task("brevo2", N=10)
    ds = task_dataset(t, "test", seed=4)
    assert len(ds) >= 2**62
    for i in (0, 17, 10**12):
        np.testing.assert_array_equal(ds[i]["tokens"], t.sample(i, "test", 4).tokens)
        np.testing.assert_array_equal(ds[i]["labels"], t.sample(i, "test", 4).labels)


def test_mixture_weights():
    cfg = _cfg(shuffle_buffer=0)
    src = make_sample_dataset(cfg, split="train")
    idx = np.array([src.task_index(j) for j in range(4000)])
    counts = np.bincount(idx, minlength=3)
    assert scipy.stats.chisquare(counts, np.array([1, 2, 1]) / 4 * 4000).pvalue > 1e-3


def test_config_validation():
    with pytest.raises(ValueError, match="shuffle_buffer"):
        _cfg(shuffle_buffer=-1)
    with pytest.raises(ValueError, match="loss_on"):
        _cfg(loss_on="some")
    with pytest.raises(ValueError, match="valid tasks"):
        DataConfig(tasks=[{"name": "nope"}])
    with pytest.raises(ValueError, match="unknown keys"):
        DataConfig(tasks=[{"name": "mano", "wieght": 2}])
    with pytest.raises(ValueError, match="valid fields"):
        DataConfig.from_dict({"seq_length": 5})
    with pytest.raises(ValueError, match="valid parameters"):
        make_dataset(DataConfig(tasks=[{"name": "mano", "params": {"LL": 3}}]), split="train", batch_size=1)
    ds = make_dataset(
        _cfg(seq_len=64, tasks=[TaskSpec("depo1", 1.0, {"N": 375})], read_chunk=4), split="test", batch_size=1
    )
    with pytest.raises(SampleTooLongError, match="does not fit"):
        next(iter(ds))


_WORKERS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from absl import flags

    from canon_jax.data import DataConfig, TaskSpec, make_dataset


    def take(cfg, n, state=None, state_after=None):
        it = iter(make_dataset(cfg, split="train", batch_size=2))
        if state is not None:
            it.set_state(state)
        out, st = [], None
        for i in range(n):
            if i == state_after:
                st = it.get_state()
            out.append(next(it))
        if hasattr(it, "close"):
            it.close()
        return out, st


    if __name__ == "__main__":
        flags.FLAGS.mark_as_parsed()
        tasks = [TaskSpec("depo1", 1.0, {"N": 20, "K": 4}), TaskSpec("mano", 1.0, {"L": 4})]
        c0 = DataConfig(tasks=tasks, seq_len=128, seed=5, num_workers=0)
        c2 = DataConfig(tasks=tasks, seq_len=128, seed=5, num_workers=2)
        a, _ = take(c0, 6)
        b, st = take(c2, 6, state_after=3)
        same = all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        rest, _ = take(c2, 3, state=st)  # resume a 2-worker iterator mid-stream
        resumed = all(np.array_equal(x[k], y[k]) for x, y in zip(a[3:], rest) for k in x)
        print(json.dumps({"same": same, "resumed": resumed}))
""")


def test_worker_count_does_not_change_batches(tmp_path):
    script = tmp_path / "workers.py"
    script.write_text(_WORKERS_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == '{"same": true, "resumed": true}'


def test_presets_fit_their_windows():
    from canon_jax.data import PRESETS, preset

    for name in PRESETS:
        cfg = preset(name)
        for t in cfg.vocabulary().tasks:
            longest = max(len(t.sample(i, "test", 0)) for i in range(3))
            assert longest <= cfg.seq_len, (name, t.name, longest)
    with pytest.raises(ValueError, match="valid presets"):
        preset("cpu_depo9")


def test_window_permute_handles_a_partial_last_window():
    import grain

    from canon_jax.data.pipeline import WindowPermuteMapDataset

    ds = WindowPermuteMapDataset(grain.MapDataset.range(10), window_size=4, seed=3)
    out = [ds[j] for j in range(len(ds))]
    assert len(ds) == 10
    # a permutation inside each window [0,4), [4,8), [8,10): nothing wraps to earlier elements
    assert sorted(out[:4]) == [0, 1, 2, 3] and sorted(out[4:8]) == [4, 5, 6, 7] and sorted(out[8:]) == [8, 9]
    assert out != list(range(10))
    with pytest.raises(IndexError):
        ds[10]


def test_capo_finite_stream_gives_exact_exposures():
    """num_samples = num_people * exposures: each person's biography appears exactly `exposures` times, also when the
    shuffle window does not divide the stream and across process shards; the packed batches keep every sample."""
    N, E = 30, 3
    spec = [{"name": "capo", "params": {"num_people": N, "exposures": E}}]
    n = DataConfig(tasks=spec).capo_num_samples()
    assert n == N * E
    cfg = DataConfig(tasks=spec, seq_len=256, shuffle_buffer=64, num_samples=n)  # 64 does not divide 90
    task = cfg.vocabulary().tasks[0]
    persons = {tuple(task.sample(i, "train", 0).tokens.tolist()): task.person_of(i, "train", 0) for i in range(n)}
    shards = [make_sample_dataset(cfg, split="train", process_index=p, process_count=2) for p in (0, 1)]
    seen = [persons[tuple(ds[j]["tokens"].tolist())] for ds in shards for j in range(len(ds))]
    assert len(seen) == n and np.bincount(seen, minlength=N).tolist() == [E] * N
    batches = list(iter(make_dataset(cfg, split="train", batch_size=4)))
    for b in batches:
        chex.assert_shape([b["inputs"], b["loss_mask"], b["segment_ids"]], [(4, 256)] * 3)
    # every sample is packed exactly once (segments counted per window); the filler windows are empty
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == n
    last = batches[-1]
    empty = last["segment_ids"].max(axis=1) == 0
    assert empty.any() and (last["inputs"][empty] == PAD).all() and (last["loss_mask"][empty] == 0).all()
    with pytest.raises(ValueError, match="only task is capo"):
        DataConfig(tasks=spec + [{"name": "mano"}]).capo_num_samples()
    with pytest.raises(ValueError, match="num_samples"):
        DataConfig(tasks=spec, num_samples=0)
