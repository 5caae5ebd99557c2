"""The merged strategy's effective-weight policy: "keep" (the forward's W_eff reused by the
backward) against "recompute" (the default: rebuilt there). Same bits, fewer launches, one
weight more kept for backward, nothing kept where no input gradient is asked for."""
import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast import use_backend, use_strategy, use_weight_policy
from tenvoo_fast.measure import owned_tensors, saved_bytes
from tests.layer_checks import CONV_MAKERS, LINEAR_MAKERS, train_a_little
from tests.measure.test_budgets import extra_counts


def _two_layers(method):
    torch.manual_seed(0)
    if method == "quanta":
        return nn.Sequential(train_a_little(LINEAR_MAKERS[method](nn.Linear(16, 24), 3)),
                             train_a_little(LINEAR_MAKERS[method](nn.Linear(24, 16), 3)))
    return nn.Sequential(train_a_little(CONV_MAKERS[method](nn.Conv3d(8, 12, 3, padding=1), 3)),
                         train_a_little(CONV_MAKERS[method](nn.Conv3d(12, 8, 3, padding=1), 3)))


def _step(model, x, policy, autocast):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with use_backend("torch"), use_strategy("merged"), use_weight_policy(policy), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr", "quanta"])
def test_keeping_the_weight_gives_the_same_bits(method, autocast):
    """Two stacked layers, so that a kept weight living in a reused CPU scratch buffer would
    be overwritten by the second layer's forward before the first layer's backward."""
    model = _two_layers(method)
    x = torch.randn(8, 16) if method == "quanta" else torch.randn(1, 8, 3, 4, 3)
    kept = _step(model, x, "keep", autocast)
    rebuilt = _step(model, x, "recompute", autocast)
    for a, b in zip(kept, rebuilt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
def test_keeping_the_weight_saves_the_rebuild_launches(method):
    """The rebuild is the last step's GEMM and the fold (two ops with a frozen copy)."""
    with use_weight_policy("recompute"):
        rebuilt = extra_counts(method, 32, 64, "torch", "merged")
    with use_weight_policy("keep"):
        kept = extra_counts(method, 32, 64, "torch", "merged")
    assert rebuilt[0] - kept[0] in (2, 3), (rebuilt, kept)
    assert kept[1:] == rebuilt[1:]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_the_kept_weight_is_one_weight_in_the_compute_dtype(requires_grad):
    """Keeping costs one effective weight (bf16 under bf16 autocast) until the backward; a
    layer whose input needs no gradient (a network's first) keeps none: its backward never
    reads the weight."""
    torch.manual_seed(0)
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(16, 32, 3, padding=1), 4)
    x = torch.randn(1, 16, 4, 4, 4, requires_grad=requires_grad)

    def kept_bytes(policy):
        with use_backend("torch"), use_strategy("merged"), use_weight_policy(policy), \
                torch.autocast("cpu", torch.bfloat16):
            backend = tenvoo_fast.dispatch.resolve(layer, x)
            return saved_bytes(lambda: layer(x), owned_tensors(layer, x, backend))

    extra = kept_bytes("keep") - kept_bytes("recompute")
    assert extra == (layer.weight.numel() * 2 if requires_grad else 0)


def test_a_policy_is_named_or_refused():
    assert tenvoo_fast.current_weight_policy() == "recompute"
    with use_weight_policy("keep"):
        assert tenvoo_fast.current_weight_policy() == "keep"
    assert tenvoo_fast.current_weight_policy() == "recompute"
    with pytest.raises(ValueError, match="choose one of recompute, keep"):
        with use_weight_policy("cache"):
            pass
