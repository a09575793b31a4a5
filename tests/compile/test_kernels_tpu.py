"""Every Pallas kernel compiled by libtpu (deviceless, single-chip v5e and v6e): conv forward and backward with and
without segment ids / initial state, GLA and SSD forward and backward (``value_and_grad`` through the custom VJPs),
bf16 and f32, at the paper's shapes and odd small ones (``experiments.compile_kernels.CASES``). Asserts that the
compiled program holds each expected kernel, and that every kernel carries its ``pl.CostEstimate``."""

import pytest

pytest.importorskip("libtpu")

from experiments import compile_kernels as ck
from pallas_kernels import cost

pytestmark = pytest.mark.compile


def _lower_bound(case, name):
    """Flops no kernel of ``name`` can be below, from the shapes alone: the conv's K multiply-adds per element; a
    scan kernel's one ``[Dk, C]·[C, Dv]`` state matmul per chunk (the states pass does only that)."""
    args = case.args
    if name.startswith("short_conv"):
        b, t, d = args[0].shape
        return (2 * args[1].shape[0] - 1) * b * t * d
    if case.name.startswith("gla"):
        b, t, h, dk = args[0].shape
        dv = args[2].shape[-1]
    else:  # ssd: Dk = N, Dv = P
        b, t, h, dv = args[0].shape
        dk = args[3].shape[-1]
    return 2 * b * h * t * dk * dv


@pytest.mark.parametrize("target", ["v5e", "v6e"])
@pytest.mark.parametrize("case", list(ck.CASES))
def test_kernels_compile_for_tpu(case, target):
    r = ck.compile_case(case, target)
    assert r.ok, r.error
    c = ck.CASES[case]
    assert sorted(k.name for k in r.kernels) == sorted(c.kernels["tpu"])
    for k in r.kernels:
        assert k.flops is not None and k.flops >= _lower_bound(c, k.name) > 0, (k.name, k.flops)
        assert 0 < k.scratch_bytes < 16 * 2**20, (k.name, k.scratch_bytes)  # the default scoped VMEM limit
    if c.tpu_flops is not None:  # the estimates in the compiled program are exactly the formulas
        assert sorted((k.name, k.flops) for k in r.kernels) == sorted(c.tpu_flops)


def test_conv_cost_formula_counts_the_taps():
    """The per-element count of the conv formula, by hand: K=4 taps (4 multiplies, 3 adds), bias, SiLU (exp,
    add, divide as reciprocal and multiply: 3 flops + 1 transcendental), residual."""
    assert cost.conv_flops(4, has_bias=True, activation="silu", residual=True, extra=False) == (4 + 3 + 1 + 3 + 1, 1)
    assert cost.conv_flops(1, has_bias=False, activation=None, residual=False, extra=False) == (1, 0)
