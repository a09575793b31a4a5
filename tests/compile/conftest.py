"""The compile tier: programs compiled by the real TPU and GPU compilers on a CPU-only machine (``canon_jax.aot``).

Every test here is marked ``compile``. Without the ``aot`` extra (libtpu, the CUDA plugin, nvcc) they are skipped,
except under CI (``CI=true``), where a missing extra is an error: the tier must not silently vanish.
"""

import importlib.util
import os

import pytest

_EXTRA = ("libtpu", "jax_plugins.xla_cuda12", "nvidia.cuda_nvcc")


def _missing():
    out = []
    for name in _EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(name)
    return out


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    mine = [it for it in items if str(it.fspath).startswith(here)]
    for it in mine:
        it.add_marker(pytest.mark.compile)
    missing = _missing()
    if not missing or not mine:
        return
    if os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError(
            f"CI=true but the aot extra is missing ({', '.join(missing)}): pip install -e '.[test,aot]'"
        )
    skip = pytest.mark.skip(reason=f"aot extra not installed ({', '.join(missing)}): pip install -e '.[aot]'")
    for it in mine:
        it.add_marker(skip)


@pytest.fixture(autouse=True)
def _chip_matmul_precision():
    """Compile at the default matmul precision, as a training run does on the chip. The suite's top-level conftest
    raises it to float32 for the CPU float64 oracles, which Mosaic rejects for the bf16 matmuls of splash attention."""
    import jax

    with jax.default_matmul_precision("default"):
        yield
