"""Contraction programs (strided GEMMs, no operand copies) against an fp64 einsum oracle, over
the DDPM's layer shapes and odd ones: the weight, every core's gradient, what is kept."""
import pytest
import torch
from torch import nn

from tenvoo_fast import (LoHaConv3d, LoKrConv3d, LoRAConv3d, QuanTALinear, TenVOOConv3d)
from tenvoo_fast.contraction import native_runner, program as P
from tenvoo_fast.contraction.prereduce import plan, reduce_cores
from tenvoo_fast.kernels.torch_last_step import grad_gemm
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


def _backward(prog, cores, saved, g, p):
    """The stored cores' gradients, from the program's one flat result."""
    flat = P.run_backward(prog, cores, saved, g, p)
    out, at = [], 0
    for shape in p.stored_shapes:
        n = torch.Size(shape).numel()
        out.append(flat[at:at + n].view(shape))
        at += n
    assert at == flat.numel()
    return out


def _check(p, reduced):
    """The weight and the *stored* cores' gradients (the pre-reduction's sums broadcast back
    by the program's final gather) against fp64 einsum, and autograd through the sums."""
    prog = P.program_for(p.equation, p.shapes)
    if any(p.sum_axes) or any(p.squeeze_axes):     # stored cores of their own shapes
        g = torch.Generator().manual_seed(2)
        stored = [torch.randn(s, dtype=reduced[0].dtype, generator=g) for s in p.stored_shapes]
    else:
        stored = reduced
    stored = [c.detach().clone().requires_grad_() for c in stored]
    oracle = torch.einsum(p.equation, *reduce_cores(p, stored))
    saved, left, right = P.run_forward(prog, reduce_cores(p, [c.detach() for c in stored]))
    t = torch.bmm(left, right)
    sizes = dict(prog.sizes)
    weight = t.reshape([sizes[x] for x in prog.gemm_order]).permute(prog.to_weight)
    # fp64, different summation orders: bounded relative to the largest entry.
    torch.testing.assert_close(weight, oracle.detach(), rtol=0,
                               atol=1e-12 * oracle.abs().max().item())
    g = torch.randn_like(oracle)
    (oracle * g).sum().backward()
    g_gemm = grad_gemm(prog, g, 1.0, g.dtype)      # as the program reads it
    reduced = reduce_cores(p, [c.detach() for c in stored])
    for mine, leaf in zip(_backward(prog, reduced, saved, g_gemm, p), stored):
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
    and what the forward keeps within the keep limit (10% of the weight, or 131072 numbers for
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
        grads = _backward(prog, reduced, saved, g, p)
    return [saved, left, right, *grads], counter.total()


@pytest.mark.skipif(not native_runner.available(), reason="tenvoo_fast._C not built")
@pytest.mark.parametrize("name,cin,cout,k,r", [c for c in _cases() if c[1] in (32, 128)]
                         + [("quanta", 256, 256, None, 4)])
def test_the_cpp_runner_issues_the_python_runners_calls(name, cin, cout, k, r, monkeypatch):
    """csrc/run_program.cpp runs a program as program._run does: bit-identical results (its
    CPU loops off), and the same ATen calls (a launch counter sees each of them)."""
    monkeypatch.setattr(native_runner, "LOOPS", False)
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


def _run_plain(p, reduced, watch=None):
    """The forward and backward programs' results; ``watch``: the ATen calls the two program
    runs made, by name (a profiler's view, which a dispatch mode would change)."""
    prog = P.program_for(p.equation, p.shapes)
    g = torch.randn(prog.gemm[:3], dtype=reduced[0].dtype,
                    generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        saved, left, right = P.run_forward(prog, reduced)
        grads = _backward(prog, reduced, saved, g, p)
    if watch is not None:
        watch.update(e.name for e in prof.events())
    return [saved, left, right, *grads]


@pytest.mark.skipif(not native_runner.available(), reason="tenvoo_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,cin,cout,k,r", [c for c in _cases() if c[1] in (32, 128)]
                         + [("quanta", 256, 256, None, 4)])
def test_the_cpp_runners_cpu_loops_agree_with_its_aten_calls(name, cin, cout, k, r, dtype,
                                                             monkeypatch):
    """On the CPU the C++ runner does small instructions as loops: watched by a launch
    counter it gives the same bits (it issues the ATen calls too, and keeps the loops'
    results), and its results agree with the ATen calls' within a few ulps of the sums."""
    torch.manual_seed(0)
    p, reduced = _network(name, cin, cout, k, r)
    reduced = [c.to(dtype) for c in reduced]
    looped = _run_plain(p, reduced)
    with LaunchCounter():
        counted = _run_plain(p, reduced)
    for a, b in zip(looped, counted):
        assert torch.equal(a, b)
    monkeypatch.setattr(native_runner, "LOOPS", False)
    aten = _run_plain(p, reduced)
    eps = torch.finfo(dtype).eps
    for a, b in zip(looped, aten):
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0, atol=64 * eps * scale)


@pytest.mark.skipif(not native_runner.available(), reason="tenvoo_fast._C not built")
@pytest.mark.parametrize("name", ["tenvoo-l", "lora", "loha", "lokr"])
def test_a_small_layers_programs_issue_no_aten_call_on_the_cpu(name):
    """At 8->8 channels every instruction is under the loop limit: the forward and backward
    programs make no ATen matmul or copy (watched, they issue them). (TenVOO-Q's r³ bond
    makes its weight-sized backward GEMM larger than the limit even here.)"""
    torch.manual_seed(0)
    p, reduced = _network(name, 8, 8, 3, 4)
    reduced = [c.float() for c in reduced]
    called = set()
    _run_plain(p, reduced, called)
    work = {"aten::bmm", "aten::copy_", "aten::_foreach_copy_"}
    assert not called & work, called
    with LaunchCounter():
        _run_plain(p, reduced, called)
    assert called & work


@pytest.mark.skipif(not native_runner.available(), reason="tenvoo_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_frozen", [True, False])
def test_the_cpu_fold_loop_rounds_as_the_torch_ops(dtype, with_frozen):
    """``W + (T - T0)`` as one loop over a permuted T gives the torch ops' bits (the same two
    roundings), and leaves it to them where it does not apply (watched)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 3, 2, 5, 6, generator=g, dtype=dtype).permute(3, 0, 4, 1, 2)
    frozen = torch.randn(t.shape, generator=g, dtype=dtype) if with_frozen else None
    base = torch.randn(t.shape, generator=g, dtype=dtype) * 1e3
    out = torch.empty(t.shape, dtype=dtype)
    assert native_runner.fold(t, frozen, base, out)
    expected = base + (t - frozen) if with_frozen else base + t
    assert torch.equal(out, expected)
    with LaunchCounter():
        assert not native_runner.fold(t, frozen, base, out)
    assert not native_runner.fold(t, frozen, base.to(torch.bfloat16), out.to(torch.bfloat16))
