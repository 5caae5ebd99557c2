"""Federated aggregation (ddpm/federated/aggregation.py, wire.py): every scheme's weights sum to
one, Rate-My-LoRA's follow the paper's Eq. 1 and 2 on hand-made histories, FedAvg of identical
clients returns their adapter, the exact mode adds the mean of the clients' ΔW to the base, and
only trained tensors cross the wire."""
import copy

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast.ddpm.federated.aggregation import (LAMBDA_DECAY, SCHEMES, merge_exact,
                                                    scheme_weights, weighted_mean)
from tenvoo_fast.ddpm.federated.wire import decode, encode, full_model_bytes, trained_state
from tenvoo_fast.errors import RunError


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_schemes_weights_sum_to_one(scheme):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 6, (), generator=g))
        sizes = torch.randint(1, 50, (n,), generator=g).tolist()
        prev, cur = torch.rand(n, generator=g).tolist(), torch.rand(n, generator=g).tolist()
        w = scheme_weights(scheme, sizes, previous=prev, current=cur, lam=0.2)
        assert len(w) == n and abs(sum(w) - 1) < 1e-12 and min(w) > 0


def test_rate_my_lora_follows_the_papers_equations():
    sizes = [10, 20, 30]
    # Client 0 got worse; clients 1 and 2 got better: they are penalised, w = 1 - λ (Eq. 1),
    # each weighted by its volumes (Eq. 2), normalised.
    w = scheme_weights("rate-my-lora", sizes, previous=[1.0, 1.0, 1.0],
                       current=[1.1, 0.9, 0.95], lam=0.2)
    assert w == pytest.approx([10 / 50, 16 / 50, 24 / 50])
    # Nobody worse: no penalty, the volumes' weights (FedPETuning's).
    assert scheme_weights("rate-my-lora", sizes, previous=[1.0, 1.0, 1.0],
                          current=[0.9, 1.0, 0.8], lam=0.2) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    # Unchanged metrics are neither better nor worse; the first round has no history.
    assert scheme_weights("rate-my-lora", sizes, previous=[1.0, 1.0, 1.0],
                          current=[1.2, 1.0, 0.5], lam=0.5) == pytest.approx([10 / 45, 20 / 45,
                                                                              15 / 45])
    assert scheme_weights("rate-my-lora", sizes, current=[1.0, 2.0, 3.0], lam=0.5) == \
        scheme_weights("fedpetuning", sizes)
    # λ at 0 (after decaying) is FedPETuning.
    assert scheme_weights("rate-my-lora", sizes, previous=[1, 1, 1], current=[2, 0, 0],
                          lam=0.0) == scheme_weights("fedpetuning", sizes)
    assert LAMBDA_DECAY == 0.95
    assert scheme_weights("fedavg", sizes) == [1 / 3] * 3


def test_no_client_is_a_clear_error():
    with pytest.raises(RunError, match="no client answered"):
        scheme_weights("fedavg", [])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3, 4)))


def clients(method="tenvoo-l", n=3):
    torch.manual_seed(0)
    server = Net()
    tf.inject(server, tf.AdapterConfig(method=method, rank=3, target_modules=["conv", "head"],
                                       trainable=["bias", "norm"]))
    states = []
    for k in range(n):
        state = trained_state(server)
        states.append({key: v + 0.05 * torch.randn_like(v) for key, v in state.items()})
    return server, states


def test_fedavg_of_identical_clients_is_their_adapter():
    _, states = clients()
    same = [states[0]] * 3
    for scheme in ("fedavg", "fedpetuning"):
        mean = weighted_mean(same, scheme_weights(scheme, [3, 5, 7]))
        assert all(torch.equal(mean[k], states[0][k]) for k in states[0])


@pytest.mark.parametrize("method", ["tenvoo-l", "lora"])
def test_the_exact_mode_adds_the_mean_of_the_clients_updates(method):
    server, states = clients(method)
    weights = scheme_weights("fedpetuning", [2, 3, 5])

    def effective(model):
        return {n: m.effective_weight().detach().to(torch.float64)
                for n, m in tf.adapter_layers(model).items()}

    before = effective(server)
    updates = []
    for state in states:          # each client's ΔW, from its own model
        model = copy.deepcopy(server)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        updates.append({n: w - before[n] for n, w in effective(model).items()})
    merged = copy.deepcopy(server)
    merge_exact(merged, states, weights)
    after = effective(merged)
    for name in after:
        want = before[name] + sum(w * u[name] for w, u in zip(weights, updates))
        scale = want.abs().max()
        assert (after[name] - want).abs().max() <= 1e-6 * scale, name
    # The cores restarted from the frozen copy; biases and norms are the weighted mean.
    for name, layer in tf.adapter_layers(merged).items():
        if layer.frozen_cores is not None:
            assert all(torch.equal(c, f) for c, f in zip(layer.cores, layer.frozen_cores))
    mean_norm = sum(w * s["norm.weight"].double() for w, s in zip(weights, states))
    torch.testing.assert_close(merged.norm.weight.double(), mean_norm, rtol=0, atol=1e-7)


def test_averaging_factors_is_not_averaging_updates():
    server, states = clients()
    weights = scheme_weights("fedavg", [1, 1, 1])
    exact, factors = copy.deepcopy(server), copy.deepcopy(server)
    merge_exact(exact, states, weights)
    with torch.no_grad():
        for name, p in factors.named_parameters():
            if p.requires_grad:
                p.copy_(weighted_mean(states, weights)[name])
    a = exact.conv.effective_weight()
    b = factors.conv.effective_weight()
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_only_trained_tensors_cross_the_wire():
    server, _ = clients()
    state = trained_state(server)
    assert all(".cores." in k or k.endswith(".bias") or k.startswith("norm.") for k in state)
    assert not any(".frozen_cores." in k or k.endswith(".weight") and ".cores." not in k
                   and not k.startswith("norm.") for k in state)
    data = encode(state)
    tensors_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert tensors_bytes < len(data) < tensors_bytes + 4096          # + the header
    assert len(data) < full_model_bytes(server)
    back = decode(data)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_an_adapter_that_does_not_fit_is_named():
    from tenvoo_fast.ddpm.federated.wire import fit_problem
    server, states = clients()
    reference = {k: tuple(v.shape) for k, v in trained_state(server).items()}
    assert fit_problem(states[0], reference) is None
    wrong = dict(states[0], **{"conv.cores.0": torch.zeros(1, 2, 3)})
    assert "conv.cores.0 has shape [1, 2, 3]" in fit_problem(wrong, reference)
    extra = dict(states[0], **{"other.weight": torch.zeros(2)})
    assert "1 tensors the model does not train" in fit_problem(extra, reference)


def test_a_client_trains_with_finetunes_backend_and_precision_options():
    from tenvoo_fast.ddpm.federated.rounds import (FederatedOptions, build_model,
                                                   client_validation, local_training)
    opts = FederatedOptions(preset="tiny", num_volumes=[3], backend="reference", amp="bf16")
    model = build_model(opts)
    before = {k: v.clone() for k, v in trained_state(model).items()}
    loss = local_training(model, opts, client=1, round_=1, steps=1)
    assert loss > 0 and any(not torch.equal(v, trained_state(model)[k])
                            for k, v in before.items())
    assert {p["backend"] for p in tf.execution_plan(model)} == {"reference"}
    assert client_validation(model, opts, client=1) > 0
