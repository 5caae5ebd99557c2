"""The launch counter: what it calls a launch, a copy, a view, an allocation and a sync; where
it puts them (layers' forward and backward, the optimizer); custom ops and Triton launches."""

import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast import TenVOOConv3d
from tenvoo_fast.measure.launches import LaunchCounter, classify, count_step
from tenvoo_fast.ops.merged import merged_conv3d

aten = torch.ops.aten


def test_classify():
    assert classify(aten.add.Tensor) == "launch"
    assert classify(aten.bmm.default) == "launch"
    assert classify(aten.view.default) == "view"
    assert classify(aten.as_strided.default) == "view"
    assert classify(aten.empty.memory_format) == "alloc"
    assert classify(aten.copy_.default) == "copy"
    assert classify(aten.clone.default) == "copy"
    assert classify(aten._local_scalar_dense.default) == "sync"
    # Integer indexing gathers (one kernel, no wait); a boolean mask's shape needs the host.
    t = torch.arange(6.0)
    assert classify(aten.index.Tensor, (t, [torch.tensor([1, 2])])) == "launch"
    assert classify(aten.index.Tensor, (t, [t > 2])) == "sync"
    assert classify(aten.nonzero.default) == "sync"


def test_counts_of_a_known_sequence():
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    with LaunchCounter() as c:
        z = x + y                      # launch, allocation
        z.view(16)                     # view
        z.t().contiguous()             # view, copy (a launch)
        z.sum().item()                 # launch, sync
        torch.empty(3)                 # allocation only
    t = c.total()
    assert (t.launches, t.copies, t.views, t.syncs) == (3, 1, 2, 1)
    assert t.allocations == 4
    assert c.by_op["model"]["add"] == 1


def test_a_foreach_copy_counts_the_kernels_cuda_would_run():
    """``_foreach_copy_`` is one fused kernel on CUDA only between tensors of equal sizes and
    strides; otherwise CUDA copies pair by pair, and so the counter counts."""
    dst = [torch.empty(3, 4), torch.empty(4, 5), torch.empty(2, 2)]
    same = [torch.randn(3, 4), torch.randn(4, 5), torch.randn(2, 2)]
    permuted = [torch.randn(4, 3).t(), torch.randn(5, 4).t(), torch.randn(2, 2)]
    with LaunchCounter() as c:
        torch._foreach_copy_(dst, same)
    assert (c.total().launches, c.total().copies) == (1, 1)
    with LaunchCounter() as c:
        torch._foreach_copy_(dst, permuted)
    assert (c.total().launches, c.total().copies) == (3, 3)


def test_layers_forward_backward_and_optimizer_are_attributed():
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 1))
    opt = torch.optim.Adam(model.parameters(), fused=True)
    x = torch.randn(1, 2, 4, 4, 4)
    counter = LaunchCounter()
    counter.attribute({"first": model[0], "last": model[2]})
    with counter:
        model(x).sum().backward()
        with counter.region("optimizer"):
            opt.step()
    counter.detach()
    first, last = counter.counts["first"], counter.counts["last"]
    assert counter.by_op["first"]["convolution"] == 1
    assert counter.by_op["first"]["convolution_backward"] == 1
    assert counter.by_op["last"]["convolution_backward"] == 1
    assert "convolution" not in counter.by_op["model"]          # relu, sum, ones_like
    assert counter.counts["optimizer"].launches >= 1
    assert first.syncs == last.syncs == 0


def test_the_insides_of_custom_ops_are_counted():
    """Through torch.library (as under torch.compile) or the eager Function: the same calls."""
    torch.manual_seed(0)
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L")
    x = torch.randn(1, 8, 3, 3, 3)
    cores = layer.network.views(list(layer.cores))
    frozen = [layer.frozen_delta_weight(tenvoo_fast.dispatch.get_backend("torch"))]
    args = (x, layer.weight, cores, frozen, layer.bias, layer.network.equation, 1.0,
            [1, 1, 1, 1, 1, 1, 1, 1, 1], "torch", False)
    through_op = count_step(lambda: merged_conv3d(*args)).total()
    eager = count_step(lambda: tenvoo_fast.ops.autograd.call(merged_conv3d, *args)).total()
    assert through_op.launches == eager.launches > 10
    assert through_op.copies == eager.copies


def test_triton_launches_are_counted_and_the_interpreter_is_not():
    """A launch through triton_kernels.launching counts once, whatever the kernel (here a
    stand-in that makes torch calls, as Triton's interpreter does) does inside."""
    from tenvoo_fast.triton_kernels import launching

    class Kernel:
        __name__ = "stand_in"

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                return args[0].add_(1).sum()
            return run

    t = torch.zeros(4)
    with LaunchCounter() as c:
        launching.launch(Kernel(), (1,), t, num_warps=4)
        t.add_(1)
    assert c.total().triton == 1
    assert c.total().launches == 2           # the Triton launch and the add_ outside it
    assert c.by_op["model"]["triton:stand_in"] == 1
    assert not launching.OBSERVERS           # the counter unhooks itself


def test_counting_does_not_change_the_numbers():
    torch.manual_seed(0)
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 6, 3, padding=1), 2, "Q")
    x = torch.randn(1, 4, 3, 3, 3, requires_grad=True)

    def grads():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.cores]

    with tenvoo_fast.use_backend("torch"):
        plain = grads()
        counted = {}
        count_step(lambda: counted.setdefault("g", grads()), {"l": layer})
    for a, b in zip(plain, counted["g"]):
        assert torch.equal(a, b)
