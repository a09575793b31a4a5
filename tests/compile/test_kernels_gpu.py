"""Every Pallas kernel compiled for sm_90a (H100) by XLA:GPU, Mosaic GPU and ptxas, deviceless: the cases of
``experiments.compile_kernels`` (see ``test_kernels_tpu.py``). Asserts that the compiled program holds each expected
kernel, that each fits the shared memory, and — from the ``ptxas -v`` log — that no kernel spills registers."""

import pytest

pytest.importorskip("jax_cuda12_plugin")
pytest.importorskip("nvidia.cuda_nvcc")

from experiments import compile_kernels as ck

pytestmark = pytest.mark.compile

SMEM_LIMIT = 232448  # H100 shared memory per block (opt-in), from the target description


@pytest.mark.parametrize("case", list(ck.CASES))
def test_kernels_compile_for_sm90a(case):
    r = ck.compile_case(case, "sm_90a")
    assert r.ok, r.error
    assert sorted(k.name for k in r.kernels) == sorted(ck.CASES[case].kernels["gpu"])
    for k in r.kernels:
        assert k.registers is not None, f"no ptxas log for {k.name}"
        assert k.registers <= 255 and k.spill_stores == 0 and k.spill_loads == 0, (
            f"{k.name}: {k.registers} registers, spills {k.spill_stores}/{k.spill_loads} bytes"
        )
        assert 0 < k.scratch_bytes <= SMEM_LIMIT, (k.name, k.scratch_bytes)
