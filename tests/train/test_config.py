"""Config schema: bad keys/types/values fail fast with one line naming the key; composition; every preset loads."""

import pathlib
import subprocess
import sys

import pytest
import yaml

from canon_jax.train.config import CONFIGS_ROOT, ConfigError, config_from_dict, load_config, model_config

BASE = {"data": {"tasks": [{"name": "depo1"}]}}


def _err(raw, overrides=()):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_model_section_maps_onto_model_config():
    cfg = config_from_dict(BASE, ["model.hidden_size=64", "model.canon_set=AC", "model.rope_dim=null"])
    mc = model_config(cfg)
    assert (mc.hidden_size, mc.canon_set, mc.rope_dim) == (64, "AC", None)
    assert cfg.optim.b1 == 0.9 and cfg.optim.b2 == 0.95 and cfg.optim.eps == 1e-8 and cfg.optim.grad_clip == 1.0


@pytest.mark.parametrize(
    "raw,overrides,expect",
    [
        ({"modle": {}}, (), "modle: unknown key (did you mean 'model'?)"),
        ({"model": {"hiden_size": 3}}, (), "model.hiden_size: unknown key (did you mean 'hidden_size'?)"),
        ({}, ["train.stepz=3"], "train.stepz: unknown key (did you mean 'steps'?)"),
        ({"data": {"tasks": [{"name": "depo1", "wieght": 2}]}}, (), "data.tasks[0].wieght: unknown key"),
    ],
)
def test_typo_key(raw, overrides, expect):
    msg = _err({**BASE, **raw} if "data" not in raw else raw, overrides)
    assert msg.startswith(expect), msg
    assert "valid keys" in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=abc", "optim.lr"),
        ("train.steps=1.5", "train.steps"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings"),
    ],
)
def test_wrong_type(override, key):
    msg = _err(BASE, [override])
    assert msg.startswith(key + ":"), msg


@pytest.mark.parametrize(
    "override,start,choices",
    [
        ("optim.z_loss=foo", "optim.z_loss", "['none', 'official', 'palm']"),
        ("optim.decay=some", "optim.decay", "['all', 'no_norm_bias_embed']"),
        ("model.arch=gpt", "model.arch", "('llama', 'gla', 'gdn', 'mamba2')"),
        ("model.canon_set=ABX", "model.canon_set", "'ABCD'"),
        ("data.kind=video", "data.kind", "['synthetic', 'text']"),
    ],
)
def test_bad_choice_lists_valid_ones(override, start, choices):
    msg = _err(BASE, [override])
    assert msg.startswith(start) and choices in msg, msg


@pytest.mark.parametrize(
    "overrides,start",
    [
        (["train.steps=0"], "train.steps"),
        (["optim.warmup_steps=50", "train.steps=10"], "optim.warmup_steps"),
        (["train.batch_size=6", "train.grad_accum=4"], "train.grad_accum"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
        (["mesh.tensor=0"], "mesh.tensor"),
        (["optim.b2=1.0"], "optim.b2"),
        (["model.hidden_size=30"], "model.num_heads"),
        (["data.seq_len=8192"], "data.seq_len"),
    ],
)
def test_impossible_values(overrides, start):
    assert _err(BASE, overrides).startswith(start)


def test_cli_fails_fast_with_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            str(path),
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            "optim.lrr=1",
        ],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parents[2],
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "optim.lrr: unknown key" in r.stderr
    assert not (tmp_path / "w").exists()  # nothing ran


def test_defaults_composition(tmp_path):
    (tmp_path / "m.yaml").write_text("model: {hidden_size: 64, num_layers: 3}\ntrain: {steps: 7}\n")
    (tmp_path / "e.yaml").write_text("defaults: [m.yaml]\nmodel: {num_layers: 5}\n" + yaml.safe_dump(BASE))
    cfg = load_config(tmp_path / "e.yaml", ["train.steps=9"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.train.steps) == (64, 5, 9)
    (tmp_path / "bad.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "bad.yaml")


PRESETS = sorted(p for p in CONFIGS_ROOT.rglob("*.yaml") if not {"sweeps", "findings"} & set(p.parts))
SWEEPS = sorted((CONFIGS_ROOT / "sweeps").glob("*.yaml"))
FINDINGS = sorted((CONFIGS_ROOT / "findings").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS_ROOT)) for p in PRESETS])
def test_every_preset_validates(path):
    # Model presets are fragments without a data section: give them a task so the whole config validates.
    overrides = ["data.tasks=[{name: depo1}]"] if "models" in path.relative_to(CONFIGS_ROOT).parts else []
    cfg = load_config(path, overrides)
    assert model_config(cfg).vocab_size >= 1


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_plans_valid_runs(path, tmp_path):
    """Every sweep preset loads and each of its runs composes into a valid experiment config."""
    from experiments import sweep as sw

    sweep = sw.load_sweep(path)
    sweep["dir"] = str(tmp_path / "sweep")
    runs = sw.plan(sweep)
    assert len(runs) == len(sweep["archs"]) * len(sweep["tasks"]) * len(sweep["seeds"])
    # every arch and every task once (one seed each): validating all arch x task pairs of the big grid takes ~20 s
    seen_arch, seen_task = set(), set()
    for run in runs:
        if run["arch"] in seen_arch and run["task"] in seen_task:
            continue
        seen_arch.add(run["arch"])
        seen_task.add(run["task"])
        sw._write_run_file(run)  # validates


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_every_findings_spec_loads(path):
    from experiments import findings

    spec = findings.load_spec(path)
    assert spec["comparisons"] and all(len(c["rows"]) >= 2 for c in spec["comparisons"])


def _mesh_err(batch, accum, mesh):
    from canon_jax.train.config import check_batch_divides_mesh

    cfg = config_from_dict(BASE, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    with pytest.raises(ConfigError) as e:
        check_batch_divides_mesh(cfg, mesh)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_batch_must_divide_data_parallel_size():
    from canon_jax.train.config import check_batch_divides_mesh

    # the linear 1B presets (global batch 128) with FSDP over a 256-chip v5e slice
    msg = _mesh_err(128, 1, {"data": 1, "fsdp": 256, "tensor": 1})
    assert msg.startswith(
        "train.batch_size: 128 is not divisible by the data-parallel size "
        "mesh.data*mesh.fsdp = 1*256 = 256 (on 256 devices)"
    ), msg
    assert msg.endswith("set train.batch_size=256, or mesh.data=1 mesh.fsdp=128 mesh.tensor=2"), msg
    # each micro-batch must split too: 64 sequences per micro-batch on 128 data-parallel devices
    msg = _mesh_err(128, 2, {"data": 2, "fsdp": 64, "tensor": 1})
    assert "128 / grad_accum 2 = 64 sequences per micro-batch" in msg and "mesh.data*mesh.fsdp = 2*64 = 128" in msg
    assert msg.endswith("set train.batch_size=256, or train.grad_accum=1, or mesh.data=1 mesh.fsdp=64 mesh.tensor=2")
    # the suggested settings pass; tensor parallelism does not take batch rows
    check_batch_divides_mesh(config_from_dict(BASE, ["train.batch_size=256"]), {"data": 1, "fsdp": 256, "tensor": 1})
    check_batch_divides_mesh(config_from_dict(BASE, ["train.batch_size=128"]), {"data": 1, "fsdp": 128, "tensor": 2})
    check_batch_divides_mesh(
        config_from_dict(BASE, ["train.batch_size=128", "train.grad_accum=2"]), {"data": 1, "fsdp": 64, "tensor": 2}
    )
