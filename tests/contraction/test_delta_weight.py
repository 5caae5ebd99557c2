"""ΔW of every method equals the fp64 oracle (spec strings) and the explicit-loop oracle."""
import pytest
import torch
from torch import nn

from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES
from tests.oracle import TENVOO_L, TENVOO_Q, QUANTA, loop_delta, rel_err, spec_delta
from tenvoo_fast import (LoHaConv3d, LoHaLinear, LoKrConv3d, LoKrLinear, LoRAConv3d, LoRALinear,
                         QuanTALinear, TenVOOConv3d)


def _randomise(layer, scale=0.5):
    """Give every core non-trivial values (zero-initialised factors would hide wiring bugs)."""
    with torch.no_grad():
        for p in layer.cores:
            p.uniform_(-scale, scale)
    return layer


def _conv(cin, cout, k=3, dtype=torch.float32):
    return nn.Conv3d(cin, cout, k, padding=1, dtype=dtype)


@pytest.mark.parametrize("cin,cout", DDPM_CONV_SHAPES)
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_tenvoo_ddpm_shapes(cin, cout, variant, seeded):
    layer = TenVOOConv3d.from_conv(_conv(cin, cout), 4, variant)
    d = layer.delta_weight()
    assert d.dtype == torch.float32 and d.shape == layer.weight.shape
    assert rel_err(d, spec_delta(layer)) < 1e-5


ODD = [(6, 10, (1, 3, 5), None), (12, 7, (3, 3, 3), None), (5, 9, (2, 3, 1), None),
       (8, 8, (3, 3, 3), ((2, 4, 1), (1, 2, 4)))]


@pytest.mark.parametrize("cin,cout,k,factors", ODD)
@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("rank", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_tenvoo_odd_shapes_ranks_dtypes(cin, cout, k, factors, variant, rank, dtype, seeded):
    conv = nn.Conv3d(cin, cout, k, dtype=dtype)
    layer = _randomise(TenVOOConv3d.from_conv(conv, rank, variant, factors=factors))
    d = layer.delta_weight()
    assert d.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(d, spec_delta(layer)) < tol


@pytest.mark.parametrize("variant", ["L", "Q"])
def test_tenvoo_explicit_loop_oracle(variant, seeded):
    """Row-major channel mapping and core wiring, checked without einsum (tiny shapes, r=2)."""
    fin, fout, k = (2, 2, 1), (1, 2, 1), (2, 1, 1)
    conv = nn.Conv3d(4, 2, k, dtype=torch.float64)
    layer = _randomise(TenVOOConv3d.from_conv(conv, 2, variant, factors=(fin, fout)))
    eq = TENVOO_L if variant == "L" else TENVOO_Q
    expected = loop_delta(eq, list(layer.cores), fin, fout, k)
    assert rel_err(layer.delta_weight(), expected) < 1e-12


@pytest.mark.parametrize("fin,fout", [((2, 1, 2), (2, 1, 2)), ((2, 1, 2), (1, 3, 1))])
def test_quanta_explicit_loop_oracle(fin, fout, seeded):
    lin = nn.Linear(4, fout[0] * fout[1] * fout[2], dtype=torch.float64)
    layer = _randomise(QuanTALinear.from_linear(lin, 2, factors=(fin, fout)))
    expected = loop_delta(QUANTA, list(layer.gates), fin, fout)
    assert rel_err(layer.delta_weight(), expected) < 1e-12


@pytest.mark.parametrize("fin,fout", DDPM_LINEAR_SHAPES + [(30, 30), (10, 21)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quanta_shapes(fin, fout, dtype, seeded):
    layer = _randomise(QuanTALinear.from_linear(nn.Linear(fin, fout, dtype=dtype), 4))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(layer.delta_weight(), spec_delta(layer)) < tol


BASELINE_CONV = [LoRAConv3d, LoHaConv3d, LoKrConv3d]
BASELINE_LINEAR = [LoRALinear, LoHaLinear, LoKrLinear]


@pytest.mark.parametrize("cls", BASELINE_CONV)
@pytest.mark.parametrize("cin,cout,k", [(32, 64, 3), (96, 64, 3), (6, 10, (1, 3, 5)),
                                        (7, 9, (3, 3, 3))])
@pytest.mark.parametrize("rank,alpha", [(4, None), (3, 1.5)])
def test_baseline_conv(cls, cin, cout, k, rank, alpha, seeded):
    layer = _randomise(cls.from_conv(nn.Conv3d(cin, cout, k), rank, alpha))
    assert rel_err(layer.delta_weight(), spec_delta(layer)) < 1e-5


@pytest.mark.parametrize("full_w2", [True, False])
def test_lokr_both_w2_forms(full_w2, seeded):
    layer = _randomise(LoKrConv3d.from_conv(nn.Conv3d(64, 32, 3), 2, full_w2=full_w2))
    assert len(layer.cores) == (2 if full_w2 else 3)
    assert rel_err(layer.delta_weight(), spec_delta(layer)) < 1e-5


@pytest.mark.parametrize("cls", BASELINE_LINEAR)
@pytest.mark.parametrize("fin,fout", [(128, 32), (256, 256), (10, 21)])
def test_baseline_linear(cls, fin, fout, seeded):
    layer = _randomise(cls.from_linear(nn.Linear(fin, fout), 4, 2.0))
    assert rel_err(layer.delta_weight(), spec_delta(layer)) < 1e-5


@pytest.mark.parametrize("cls", BASELINE_CONV + BASELINE_LINEAR)
def test_baselines_start_at_zero(cls, seeded):
    layer = (cls.from_conv(nn.Conv3d(16, 8, 3), 4) if "Conv" in cls.__name__
             else cls.from_linear(nn.Linear(16, 8), 4))
    assert torch.count_nonzero(layer.delta_weight()) == 0
