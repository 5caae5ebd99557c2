"""The CPU scratch pool: reused across calls, never handed out where a caller keeps the tensor."""
import pytest
import torch
from torch import nn

from tenvoo_fast import TenVOOConv3d, use_backend
from tenvoo_fast import functional
from tenvoo_fast.kernels import native_layer, workspace
from tenvoo_fast.dispatch.backends import get_backend


def test_scratch_reuses_one_buffer_per_slot_and_dtype():
    workspace.clear()
    a = workspace.scratch("t", (4, 5), torch.float32, torch.device("cpu"))
    b = workspace.scratch("t", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 3)
    c = workspace.scratch("u", (4, 5), torch.float32, torch.device("cpu"))
    d = workspace.scratch("t", (4, 5), torch.float64, torch.device("cpu"))
    assert len({a.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    grown = workspace.scratch("t", (10, 10), torch.float32, torch.device("cpu"))
    assert grown.numel() == 100 and workspace.pooled_bytes() == 100 * 4 + 20 * 4 + 20 * 8
    workspace.clear()
    assert workspace.pooled_bytes() == 0


def test_scratch_off_the_cpu_is_a_plain_allocation():
    t = workspace.scratch("t", (3,), torch.float32, torch.device("meta"))
    assert t.device.type == "meta" and workspace.pooled_bytes() == 0


def _layer(seed):
    torch.manual_seed(seed)
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L")
    with torch.no_grad():
        for c in layer.cores:
            c.add_(0.1 * torch.randn_like(c))   # move away from T(θ0) so ΔW is non-zero
    return layer


@pytest.mark.parametrize("native", [False, True], ids=["python-op", "cpp-layer"])
def test_results_do_not_alias_the_pool(native, monkeypatch):
    """Outputs, ΔW and gradients stay valid after other layers reuse the scratch buffers (the
    Python op's pool; the C++ merged layer allocates its own)."""
    if not native:
        monkeypatch.setattr(native_layer, "_RUN", None)
    elif not native_layer.available():
        pytest.skip("the C++ extension was not built")
    workspace.clear()
    a, b = _layer(0), _layer(1)
    x = torch.randn(1, 8, 4, 4, 3, requires_grad=True)
    with use_backend("torch"):
        ya = a(x)
        delta = functional.delta_weight(a.network, list(a.cores), get_backend("torch"))
        ya.sum().backward()
        grads = [c.grad.clone() for c in a.cores]
        gx = x.grad.clone()
        x.grad = None
        b(x).sum().backward()             # overwrites every scratch slot
    assert (workspace.pooled_bytes() > 0) != native     # the C++ layer takes nothing from it
    workspace.clear()
    with use_backend("torch"):       # the same deterministic code on fresh buffers
        ref = a(x)
        assert torch.equal(ya, ref)
        assert torch.equal(delta, functional.delta_weight(a.network, list(a.cores),
                                                          get_backend("torch")))
        for c in a.cores:
            c.grad = None
        x.grad = None
        ref.sum().backward()
    for c, g in zip(a.cores, grads):
        assert torch.equal(g, c.grad)
    assert torch.equal(gx, x.grad)
