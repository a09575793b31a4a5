"""canon_jax.runtime: when the CPU hint for glibc's transparent-huge-page malloc tunable is given, and that the
tunable, exported by the launcher, reaches the process (no restart, no change of PID or arguments)."""

import os
import subprocess
import sys

import pytest

from canon_jax import runtime


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("CANON_JAX_MALLOC_HUGEPAGES", raising=False)
    return monkeypatch


def test_active_parses_the_tunables_list(clean_env):
    assert not runtime.malloc_hugepages_active()
    for value, active in [
        ("glibc.malloc.hugetlb=1", True),
        ("glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", True),
        ("glibc.malloc.hugetlb=0", False),
        ("glibc.malloc.arena_max=4", False),
    ]:
        clean_env.setenv("GLIBC_TUNABLES", value)
        assert runtime.malloc_hugepages_active() is active, value


def test_hint_only_on_cpu_without_the_tunable(clean_env):
    if runtime.platform_reason() is not None:  # e.g. macOS or musl: never a hint there
        assert runtime.malloc_hugepages_hint("cpu") is None
        pytest.skip(f"the tunable does not exist on this machine: {runtime.platform_reason()}")
    hint = runtime.malloc_hugepages_hint("cpu")
    assert hint is not None and runtime.SETTING in hint
    assert runtime.malloc_hugepages_hint("tpu") is None and runtime.malloc_hugepages_hint("gpu") is None
    clean_env.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert runtime.malloc_hugepages_hint("cpu") is None
    clean_env.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # switched off on purpose: no hint either
    assert runtime.malloc_hugepages_hint("cpu") is None
    clean_env.delenv("GLIBC_TUNABLES")
    clean_env.setenv("CANON_JAX_MALLOC_HUGEPAGES", "0")
    assert runtime.malloc_hugepages_hint("cpu") is None


def test_print_hint_goes_to_stderr(clean_env, capsys):
    runtime.print_hint("gpu")
    assert capsys.readouterr() == ("", "")
    runtime.print_hint("cpu")
    out, err = capsys.readouterr()
    assert out == "" and err == ("" if runtime.platform_reason() else runtime.malloc_hugepages_hint("cpu") + "\n")


def test_exported_setting_reaches_the_process_without_restart():
    code = (
        "import os, sys; from canon_jax import runtime\n"
        "print(os.getpid(), runtime.malloc_hugepages_active(), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    env["GLIBC_TUNABLES"] = runtime.SETTING.split("=", 1)[1]
    p = subprocess.Popen([sys.executable, "-c", code, "a b"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate()
    assert p.returncode == 0
    assert out.split(" ", 2) == [str(p.pid), "True", "['a b']\n"]
