import os
import pathlib

import jax
import pytest

# Tests compare against float64 oracles: keep float32 matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

REFS = pathlib.Path(__file__).parent / "data" / "refs"


@pytest.fixture(scope="session")
def refs_dir():
    return REFS
