"""Build hooks that pyproject.toml cannot express: the presets in configs/ shipped as the package data
``canon_jax/configs``, and the native CPU conv (``canon_jax/ops/cpu/canon_conv.cc``) as an optional extension.

Everything else (metadata, dependencies, extras, scripts) is in pyproject.toml.
"""

import importlib.util
import pathlib

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


def _native_build():
    """canon_jax/ops/cpu/build.py, loaded by path: it needs only the standard library and jaxlib, not the package."""
    spec = importlib.util.spec_from_file_location("_canon_native_build", ROOT / "canon_jax/ops/cpu/build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildNative(build_ext):
    """Compiles the native CPU conv with the flags of canon_jax.ops.cpu.build (``-O3 -march=native``, or the
    baseline). A failure (no C++ compiler, no jaxlib headers) is reported and skipped: the package then uses the XLA
    path on CPU, and ``canon-build-native`` builds the library later."""

    def build_extension(self, ext):
        try:
            _native_build().build(self.get_ext_fullpath(ext.name))
        except Exception as e:  # noqa: BLE001 - optional: reported, the install goes on
            print(f"warning: the native CPU conv was not built ({e}); canon-build-native builds it later")


setup(
    packages=find_packages(include=["canon_jax", "canon_jax.*", "pallas_kernels", "pallas_kernels.*", "experiments"])
    + ["canon_jax.configs"],
    package_dir={"canon_jax.configs": "configs"},
    ext_modules=[Extension("canon_jax.ops.cpu._canon_conv", ["canon_jax/ops/cpu/canon_conv.cc"], optional=True)],
    cmdclass={"build_ext": BuildNative},
)
