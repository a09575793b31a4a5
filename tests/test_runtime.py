"""canon_jax.runtime: the once-only restart with glibc's transparent-huge-page malloc tunable."""

import os
import subprocess
import sys
import textwrap

import pytest

from canon_jax import runtime

SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
    if __name__ == "__main__":
        from canon_jax.runtime import use_malloc_hugepages
        use_malloc_hugepages()
    print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
""")


def run(tmp_path, env_extra):
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", "CANON_JAX_MALLOC_HUGEPAGES", "CANON_JAX_MALLOC_HUGEPAGES_SET")
    }
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, str(script), "a b", "--x=1"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return [line.split(" ", 2) for line in out.splitlines()]


def test_restart_once_with_tunable_and_same_arguments(tmp_path):
    if runtime.platform_reason() is not None:  # e.g. macOS or musl: the helper is a no-op there (next test)
        pytest.skip(f"the tunable does not exist on this machine: {runtime.platform_reason()}")
    # another tunable already set: ours is appended, the process restarts once, same PID and arguments
    lines = run(tmp_path, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert [l[0] for l in lines] == ["start", "start", "main"], lines
    pids = {l[1] for l in lines}
    assert len(pids) == 1, "exec keeps the PID"
    assert lines[1][2].startswith("glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ")
    assert lines[1][2].endswith("['a b', '--x=1']") and lines[0][2].endswith("['a b', '--x=1']")


def test_no_restart_when_disabled_or_already_set(tmp_path):
    for env in ({"CANON_JAX_MALLOC_HUGEPAGES": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        lines = run(tmp_path, env)
        assert [l[0] for l in lines] == ["start", "main"], (env, lines)


def test_no_restart_from_stdin_or_dash_c(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLIBC_TUNABLES", "CANON_JAX_MALLOC"))}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    code = SCRIPT.replace('if __name__ == "__main__":', "if True:")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert [line.split(" ", 1)[0] for line in out.splitlines()] == ["start", "main"], out
    out = subprocess.run([sys.executable, "-"], input=code, env=env, capture_output=True, text=True, check=True).stdout
    assert [line.split(" ", 1)[0] for line in out.splitlines()] == ["start", "main"], out


def test_reasons(monkeypatch):
    monkeypatch.setenv("CANON_JAX_MALLOC_HUGEPAGES", "0")
    assert "disabled" in runtime.malloc_hugepages_reason()
    monkeypatch.delenv("CANON_JAX_MALLOC_HUGEPAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert "already sets" in runtime.malloc_hugepages_reason()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.delenv("CANON_JAX_MALLOC_HUGEPAGES_SET", raising=False)
    # inside pytest JAX has started: a live process is never restarted
    import jax

    jax.devices()
    assert runtime.malloc_hugepages_reason() is not None
    runtime.use_malloc_hugepages()  # returns instead of exec'ing the test process
