import os
import pathlib

# The suite runs on the host CPU. Setting the platform before jax starts also keeps the aot extra's CUDA plugin from
# looking for a driver, so the deviceless GPU compile tests (tests/compile) run instead of skipping.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest

# Tests compare against float64 oracles: keep float32 matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

REFS = pathlib.Path(__file__).parent / "data" / "refs"


@pytest.fixture(scope="session")
def refs_dir():
    return REFS
