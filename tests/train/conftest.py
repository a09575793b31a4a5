"""Trainer tests compile the same tiny programs in several processes: share a persistent compilation cache. The
commands' CPU hint for the malloc tunable (canon_jax/runtime.py) is silenced: the tests check their exact output."""

import os

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = {
        k: os.environ.get(k)
        for k in (
            "JAX_COMPILATION_CACHE_DIR",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
        )
    }
    # subprocesses (kill/resume, multi-device) inherit the cache through the environment
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=path,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    prev = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", prev)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def no_malloc_hint():
    old = os.environ.get("CANON_JAX_MALLOC_HUGEPAGES")
    os.environ["CANON_JAX_MALLOC_HUGEPAGES"] = "0"  # inherited by the subprocesses the tests start
    yield
    if old is None:
        os.environ.pop("CANON_JAX_MALLOC_HUGEPAGES", None)
    else:
        os.environ["CANON_JAX_MALLOC_HUGEPAGES"] = old
