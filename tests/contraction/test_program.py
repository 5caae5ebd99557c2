"""Contraction programs (strided GEMMs, no operand copies) against an fp64 einsum oracle, over
the DDPM's layer shapes and odd ones: the weight, every core's gradient, what is kept."""
import pytest
import torch
from torch import nn

from tenvoo_fast import (LoHaConv3d, LoKrConv3d, LoRAConv3d, QuanTALinear, TenVOOConv3d)
from tenvoo_fast.contraction import native_runner, program as P
from tenvoo_fast.contraction.prereduce import plan, reduce_cores
from tenvoo_fast.measure.launches import LaunchCounter
from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES

CONV = {"tenvoo-l": lambda c, r: TenVOOConv3d.from_conv(c, r, "L"),
        "tenvoo-q": lambda c, r: TenVOOConv3d.from_conv(c, r, "Q"),
        "lora": LoRAConv3d.from_conv, "loha": LoHaConv3d.from_conv, "lokr": LoKrConv3d.from_conv}
ODD = [(24, 40, (3, 1, 2), 3), (6, 12, (1, 3, 3), 5), (1, 8, (3, 3, 3), 2)]


def _cases():
    for name in CONV:
        for cin, cout in DDPM_CONV_SHAPES[::4]:
            yield name, cin, cout, 3, 4
        for cin, cout, k, r in ODD:
            yield name, cin, cout, k, r


def _network(name, cin, cout, k, r):
    if name == "quanta":
        layer = QuanTALinear.from_linear(nn.Linear(cin, cout), r)
    else:
        layer = CONV[name](nn.Conv3d(cin, cout, k), r)
    net = layer.network
    cores = [c.detach().double().normal_() for c in net.views(list(layer.cores))]
    p = plan(net.equation, tuple(tuple(c.shape) for c in cores))
    return p, reduce_cores(p, cores)


def _check(p, reduced):
    prog = P.program_for(p.equation, p.shapes)
    saved, left, right = P.run_forward(prog, reduced)
    t = torch.bmm(left, right)
    sizes = dict(prog.sizes)
    weight = t.reshape([sizes[x] for x in prog.gemm_order]).permute(prog.to_weight)
    leaves = [c.clone().requires_grad_() for c in reduced]
    oracle = torch.einsum(p.equation, *leaves)
    # fp64, different summation orders: bounded relative to the largest entry.
    torch.testing.assert_close(weight, oracle, rtol=0, atol=1e-12 * oracle.abs().max().item())
    g = torch.randn_like(oracle)
    (oracle * g).sum().backward()
    out_idx = p.equation.split("->")[1]
    g_gemm = g.permute([out_idx.index(x) for x in prog.gemm_order]).reshape(t.shape)
    for mine, leaf in zip(P.run_backward(prog, reduced, saved, g_gemm), leaves):
        torch.testing.assert_close(mine, leaf.grad, rtol=0,
                                   atol=1e-12 * leaf.grad.abs().max().item())
    return prog


@pytest.mark.parametrize("name,cin,cout,k,r", list(_cases()))
def test_conv_programs_match_the_oracle(name, cin, cout, k, r):
    torch.manual_seed(0)
    _check(*_network(name, cin, cout, k, r))


@pytest.mark.parametrize("shape", DDPM_LINEAR_SHAPES + [(24, 40)])
def test_quanta_programs_match_the_oracle(shape):
    torch.manual_seed(0)
    _check(*_network("quanta", *shape, None, 4))


@pytest.mark.parametrize("variant", "LQ")
def test_programs_copy_little_and_keep_little(variant):
    """Over the DDPM's TenVOO layers: a few copy calls per step (a group of relayouts is one),
    and what the forward keeps within the keep limit (5% of the weight, or 65536 numbers for
    a small layer)."""
    for cin, cout in DDPM_CONV_SHAPES:
        p, reduced = _network(f"tenvoo-{variant.lower()}", cin, cout, 3, 4)
        prog = P.program_for(p.equation, p.shapes)
        assert prog.copies <= (10 if variant == "L" else 16), (cin, cout, prog.copies)
        assert prog.saved_numel <= max(P.KEEP_FRACTION * cin * cout * 27, P.KEEP_ELEMENTS)


def _run_both_ways(p, reduced, native: bool, monkeypatch):
    monkeypatch.setattr(native_runner, "RUNNER", native_runner.RUNNER if native else None)
    prog = P.program_for(p.equation, p.shapes)
    counter = LaunchCounter()
    with counter:
        saved, left, right = P.run_forward(prog, reduced)
        g = torch.randn(prog.gemm[:3], dtype=left.dtype, generator=torch.Generator().manual_seed(1))
        grads = P.run_backward(prog, reduced, saved, g)
    return [saved, left, right, *grads], counter.total()


@pytest.mark.skipif(not native_runner.available(), reason="tenvoo_fast._C not built")
@pytest.mark.parametrize("name,cin,cout,k,r", [c for c in _cases() if c[1] in (32, 128)]
                         + [("quanta", 256, 256, None, 4)])
def test_the_cpp_runner_issues_the_python_runners_calls(name, cin, cout, k, r, monkeypatch):
    """csrc/run_program.cpp runs a program as program._run does: bit-identical results, and
    the same ATen calls (a launch counter sees each of them)."""
    torch.manual_seed(0)
    p, reduced = _network(name, cin, cout, k, r)
    reduced = [c.float() for c in reduced]
    ours, ours_counts = _run_both_ways(p, reduced, True, monkeypatch)
    theirs, their_counts = _run_both_ways(p, reduced, False, monkeypatch)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert (ours_counts.launches, ours_counts.copies) == (their_counts.launches,
                                                          their_counts.copies)
    assert ours_counts.launches > 0


def test_the_cpp_runners_table_is_made_on_the_cpu_whatever_the_default_device():
    """A program first run under ``torch.device(...)`` or ``set_default_device`` must not
    cache its table on that device (the C++ runner reads it on the host)."""
    p, reduced = _network("tenvoo-l", 32, 64, 3, 4)
    prog = P.program_for(p.equation, p.shapes)
    with torch.device("meta"):
        table, width = native_runner._encode(prog.forward, True, P._relayout_views_of)
    assert table.device.type == "cpu" and table.dtype == torch.int64 and width > 0
