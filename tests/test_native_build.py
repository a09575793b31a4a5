"""The native CPU conv library (canon_jax/ops/cpu): built by the install (or canon-build-native), loaded only when it
was built from this source. Its numerics are tested against float64 loops in tests/ops/test_causal_conv1d.py."""

import os

import pytest

from canon_jax.ops import cpu as native_cpu
from canon_jax.ops.cpu import build


def test_built_by_the_install_in_ci():
    # CI installs the package (pip install -e .), which builds the library: the kernel tests must not skip there.
    if not os.environ.get("CI"):
        pytest.skip("outside CI the library is optional (canon-build-native builds it)")
    assert native_cpu.available(), native_cpu.unavailable_reason()


def test_library_from_another_source_is_refused(monkeypatch):
    if not build.default_library_path().exists():
        pytest.skip("the native library is not built here")
    saved = dict(native_cpu._state)
    monkeypatch.setattr(build, "source_hash", lambda: "0" * 16)
    native_cpu._state.clear()
    try:
        assert not native_cpu.available()
        assert "built from another version of canon_conv.cc" in native_cpu.unavailable_reason()
        assert "canon-build-native" in native_cpu.unavailable_reason()
    finally:
        native_cpu._state.clear()
        native_cpu._state.update(saved)


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    saved = dict(native_cpu._state)
    monkeypatch.setattr(build, "default_library_path", lambda: tmp_path / "absent.so")
    native_cpu._state.clear()
    try:
        assert not native_cpu.available()
        reason = native_cpu.unavailable_reason()
        assert "absent.so is not built" in reason and "canon-build-native" in reason, reason
    finally:
        native_cpu._state.clear()
        native_cpu._state.update(saved)


def test_flags(monkeypatch):
    monkeypatch.delenv("CANON_JAX_NATIVE_FLAGS", raising=False)
    assert build.target_flags() == ["-march=native"]
    monkeypatch.setenv("CANON_JAX_NATIVE_FLAGS", "-march=x86-64-v3 -mtune=generic")
    assert build.target_flags() == ["-march=x86-64-v3", "-mtune=generic"]
    assert build.library_filename().startswith("_canon_conv") and build.library_filename().endswith(".so")
