"""The tensor networks as data: shapes, parameter counts and initialisation."""
import math

import pytest
import torch

from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES
from tests.oracle import SPEC_TABLE, eq6, quanta_params
from tenvoo_fast import AdapterError, QuanTALinear, TenVOOConv3d, methods
from tenvoo_fast.methods.channels import general_factors

ODD_CONV = [((6, 4, 1), (3, 2, 1), (1, 3, 5)), ((3, 5, 7), (2, 1, 3), (3, 3, 3)),
            ((1, 1, 1), (2, 2, 2), (2, 1, 1))]


@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 8, 12])
def test_tenvoo_param_count_matches_eq6(variant, rank):
    cases = [(SPEC_TABLE[i], SPEC_TABLE[o], (3, 3, 3)) for i, o in DDPM_CONV_SHAPES] + ODD_CONV
    for fin, fout, k in cases:
        net = methods.tenvoo(variant, fin, fout, k, rank)
        assert net.num_params == eq6(variant, fin, fout, k, rank)
        assert len(net.cores) == 10


@pytest.mark.parametrize("rank", [1, 3, 4, 7])
def test_quanta_param_count(rank):
    for i, o in DDPM_LINEAR_SHAPES + [(30, 30), (10, 21)]:
        fi = SPEC_TABLE.get(i) or general_factors(i)
        fo = SPEC_TABLE.get(o) or general_factors(o)
        net = methods.quanta(fi, fo, rank)
        assert net.num_params == quanta_params(fi, fo, rank)


def test_core_shapes_follow_spec_tables():
    r = 3
    L = methods.tenvoo("L", (16, 8, 4), (8, 8, 2), (3, 2, 1), r)
    assert L.shapes == ((8, 16, r, r), (4, r, r, r), (3, r, r, r), (2, r, r, r), (1, r, r, r),
                        (2, r, r, r), (8, r, r, 8), (r, r, r, r), (r, r, r, r), (r, r, r))
    Q = methods.tenvoo("Q", (16, 8, 4), (8, 8, 2), (3, 2, 1), r)
    assert Q.shapes[3] == (2, 1, r, r) and Q.shapes[9] == (r, r, r, r)
    eq = methods.quanta((8, 8, 2), (4, 4, 2), r)
    assert eq.shapes == ((r, r, 8, 2), (r, 2, 8, r), (4, 4, r, r))
    same = methods.quanta((8, 8, 2), (8, 8, 2), r)
    assert same.shapes == ((8, 2, 8, 2), (8, 2, 8, 2), (8, 8, 8, 8))


def _bound(shape, r):
    fan_in = shape[-2] * shape[-1] if len(shape) == 4 else 2 * r
    return math.sqrt(6 / fan_in)


@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_tenvoo_init_bounds(variant, rank, seeded):
    conv = torch.nn.Conv3d(64, 32, 3)
    layer = TenVOOConv3d.from_conv(conv, rank, variant)
    for p in layer.cores:
        b = _bound(tuple(p.shape), rank)
        assert p.abs().max().item() <= b + 1e-7
        if p.numel() >= 200:  # uniform: the sample reaches most of [-b, b], mean near 0
            assert p.abs().max().item() > 0.8 * b
            assert abs(p.mean().item()) < 0.1 * b
    for p, f in zip(layer.cores, layer.frozen_cores):
        assert torch.equal(p, f)


def test_zero_last_init_and_no_frozen_copy(seeded):
    layer = TenVOOConv3d.from_conv(torch.nn.Conv3d(8, 8, 3), 3, "L", init="zero-last")
    assert layer.frozen_cores is None
    assert torch.count_nonzero(layer.cores[9]) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_quanta_init_bounds(seeded):
    for lin in (torch.nn.Linear(128, 32), torch.nn.Linear(128, 128)):
        layer = QuanTALinear.from_linear(lin, 4)
        for g in layer.gates:
            b = math.sqrt(3 / (g.shape[2] * g.shape[3]))
            assert g.abs().max().item() <= b + 1e-7 and g.abs().max().item() > 0.8 * b


def test_lora_loha_lokr_init():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 64, 3)
    lora = methods.lora(64, 32, (3, 3, 3), 4)
    assert lora.cores[0].init.value == pytest.approx(1 / math.sqrt(32 * 27))
    assert lora.cores[1].init.kind == "zeros"
    loha = methods.loha(64, 32, (3, 3, 3), 4)
    assert [c.init.kind for c in loha.cores] == ["normal", "normal", "zeros", "normal"]
    assert [c.init.value for c in loha.cores] == [0.1, 1.0, 0.0, 1.0]
    lokr = methods.lokr(64, 32, (3, 3, 3), 4)
    assert lokr.cores[0].init.kind == "uniform" and lokr.cores[-1].init.kind == "zeros"
    assert math.prod(lokr.meta["out_split"]) == 64 and math.prod(lokr.meta["in_split"]) == 32
    del conv


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", True])
def test_rank_must_be_positive_int(bad):
    with pytest.raises(AdapterError, match="rank"):
        methods.tenvoo("L", (2, 2, 1), (2, 2, 1), (3, 3, 3), bad, layer="blk.conv")


def test_unknown_variant_and_init():
    with pytest.raises(AdapterError, match="variant"):
        methods.tenvoo("X", (2, 2, 1), (2, 2, 1), (3, 3, 3), 2)
    with pytest.raises(AdapterError, match="init"):
        methods.tenvoo("L", (2, 2, 1), (2, 2, 1), (3, 3, 3), 2, init="zeros")
