"""`python -m canon_jax.data dump|show|vocab`."""

import json
import re
import subprocess
import sys

from canon_jax.data import get_task
from canon_jax.data.cli import main


def _dump(tmp_path, *args):
    out = tmp_path / "s.jsonl"
    assert main(["dump", *args, "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_dump_canon_and_official_ids(tmp_path):
    rows = _dump(tmp_path, "depo1", "--split", "test", "--num", "2", "--seed", "4", "--set", "N=30")
    task = get_task("depo1", N=30)
    for i, row in enumerate(rows):
        s = task.sample(i, "test", 4)
        assert row["tokens"] == s.tokens.tolist() and row["loss_mask"] == s.labels.tolist()
        assert row["meta"]["n"] == 30 and row["meta"]["ks"] == s.meta["ks"]
    off = _dump(
        tmp_path,
        "depo1",
        "--split",
        "test",
        "--num",
        "2",
        "--seed",
        "4",
        "--set",
        "N=30",
        "--id-convention",
        "official",
    )
    toks = off[0]["tokens"]
    assert (
        toks[0] == 9999 and 9500 in toks and all(1 <= t <= 100 or 9001 <= t <= 9008 or t in (9500, 9999) for t in toks)
    )
    br = _dump(tmp_path, "brevo1", "--num", "1", "--id-convention", "official", "--set", "N=20")[0]["tokens"]
    assert br[0] == 9999 and 9997 in br and br[-1] == 9998 and br[br.index(9997) + 2] == 9998
    mano = _dump(
        tmp_path,
        "mano",
        "--split",
        "test",
        "--num",
        "3",
        "--id-convention",
        "official",
        "--set",
        "L=3",
        "--set",
        "knowledge_augment=false",
    )
    for row in mano:
        t = row["tokens"]
        assert t[0] == 9999 and t[1] == 30 and t[-2] == 34 and t[-1] == 5000 + row["meta"]["answer"]
        assert row["meta"]["L"] == 3 and row["loss_mask"][-1] == 1 and sum(row["loss_mask"]) == 1
    capo = _dump(tmp_path, "capo", "--num", "1", "--set", "num_people=10")[0]
    assert set(capo["meta"]["attributes"]) >= {"birthyear", "birthcity", "company1name"} and capo["meta"]["text"]


def test_show_and_errors(capsys, tmp_path):
    assert main(["show", "brevo1", "--set", "N=10", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "edges:" in out and "answer:" in out and "n=10" in out
    assert main(["show", "mano", "--set", "L=2", "--num", "2"]) == 0
    assert "(mod 23)" in capsys.readouterr().out

    def refused(args, pattern):  # one line "config error: ..." on stderr, status 2
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("config error: ") and err.count("\n") == 1 and re.search(pattern, err), err

    refused(["show", "dpo1"], "valid tasks")
    refused(["show", "depo1", "--set", "Z=1"], "valid parameters")
    refused(["show", "depo1", "--set", "N=5", "--set", "K=5"], "K must satisfy")
    refused(["show", "depo1", "--set", "N"], "KEY=VALUE")
    # the impossible parameters, through the CLI: N < 3, L < 1, an unknown cfg (valid ones listed)
    refused(["dump", "brevo1", "--set", "N=2", "--out", "-"], "N must be >= 3")
    refused(["dump", "mano", "--set", "L=0", "--out", "-"], r"L \(number of operations\) must be >= 1")
    refused(["show", "lano", "--set", "cfg=cfg3z"], r"unknown cfg 'cfg3z'; valid cfgs: \['cfg3b'")
    refused(["show", "mano", "--set", "L=ten"], "expects int")
    missing = tmp_path / "no" / "such" / "folder" / "s.jsonl"
    refused(["dump", "depo1", "--out", str(missing)], r"--out: the folder .*folder does not exist")
    assert not (tmp_path / "no").exists()
    assert main(["vocab", "depo1", "mano"]) == 0
    assert "vocab_size" in capsys.readouterr().out


def test_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "canon_jax.data", "show", "depo2", "--set", "N=8", "--set", "K=4"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": ".", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0 and "-hop(" in r.stdout and "edges:" in r.stdout, r.stderr
