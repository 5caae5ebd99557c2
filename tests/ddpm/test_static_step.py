"""``--graph``'s static step: on the CPU it is the eager step bit for bit, it never waits on the
device inside the step, it skips a non-finite step on the device, and it would capture again
exactly when what a graph was captured over changes (load_adapter, ``.to()``)."""
import copy
import json
from functools import partial

import pytest
import torch

from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.static_step import StaticStep
from tenvoo_fast.ddpm.training import SCHEDULER, NonFiniteLoss, optimizer_step
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.measure.launches import LaunchCounter
from tenvoo_fast.model import AdapterConfig, inject, load_adapter, save_adapter

CPU = torch.device("cpu")
NO_AMP = partial(torch.autocast, "cpu", dtype=None, enabled=False)


def _model(method="tenvoo-l", seed=0):
    torch.manual_seed(seed)
    model = build_unet("tiny")
    if method != "full":
        defaults = FinetuneOptions()
        inject(model, AdapterConfig(method=method, rank=4, target_modules=list(defaults.targets),
                                    trainable=tuple(defaults.trainable)))
    return model


def _parts(model):
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                 fused=True)
    return DiffusionInferer(DDPMScheduler(**SCHEDULER)), optimizer


def _batches(seed=1, dtype=torch.float32, poison_at=None):
    g = torch.Generator().manual_seed(seed)
    k = 0
    while True:
        batch = torch.rand(1, 1, 16, 16, 16, generator=g).to(dtype)
        if k == poison_at:
            batch[0, 0, 0, 0, 0] = float("nan")
        k += 1
        yield batch


@pytest.mark.parametrize("method,accum", [("tenvoo-l", 2), ("full", 1), ("tenvoo-q", 1)])
def test_static_step_is_the_eager_step_bit_for_bit(method, accum):
    eager_model = _model(method)
    static_model = copy.deepcopy(eager_model)
    inferer, eager_opt = _parts(eager_model)
    _, static_opt = _parts(static_model)
    static = StaticStep(static_model, inferer, static_opt, NO_AMP, accum, CPU, warmup=1)
    eager_rng, static_rng = (torch.Generator().manual_seed(7) for _ in range(2))
    eager_batches, static_batches = _batches(), _batches()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        expected = optimizer_step(eager_model, eager_batches, inferer, eager_opt, scaler, NO_AMP,
                                  accum, CPU, 1, eager_rng)
        assert static(static_batches, static_rng) == expected
    for (name, a), b in zip(eager_model.named_parameters(), static_model.parameters()):
        assert torch.equal(a, b), name
    assert static.captures == 1            # captured once, after the warm-up call


def test_no_host_sync_inside_the_step_and_the_detector_sees_one_outside():
    model = _model()
    inferer, optimizer = _parts(model)
    static = StaticStep(model, inferer, optimizer, NO_AMP, 1, CPU)
    rng, batches = torch.Generator().manual_seed(0), _batches()
    static(batches, rng)                   # warm-up: optimizer state exists
    static._fill(batches, rng)
    with LaunchCounter() as counter:
        static.body()
    assert counter.total().syncs == 0 and counter.total().launches > 100
    with LaunchCounter() as counter:        # the eager step reads its loss inside the step
        optimizer_step(model, batches, inferer, optimizer,
                       torch.amp.GradScaler("cpu", enabled=False), NO_AMP, 1, CPU, 1, rng)
    assert counter.total().syncs >= 1


def test_a_non_finite_loss_skips_the_step_on_the_device_and_raises():
    model = _model()
    inferer, optimizer = _parts(model)
    static = StaticStep(model, inferer, optimizer, NO_AMP, 1, CPU)
    rng, batches = torch.Generator().manual_seed(0), _batches(poison_at=2)
    static(batches, rng)
    static(batches, rng)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    with pytest.raises(NonFiniteLoss) as e:
        static(batches, rng)
    assert e.value.batch_finite is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = optimizer.state_dict()["state"]
    for k, v in state.items():
        for name, t in v.items():
            assert torch.equal(t, after[k][name]), (k, name)


def test_captures_again_after_load_adapter_and_to(tmp_path):
    """A changed step runs eagerly once (warming up what changed), then is captured again."""
    model = _model()
    inferer, optimizer = _parts(model)
    static = StaticStep(model, inferer, optimizer, NO_AMP, 1, CPU, warmup=1)
    rng, batches = torch.Generator().manual_seed(0), _batches()
    for _ in range(3):
        static(batches, rng)
    assert static.captures == 1
    other = _model(seed=5)                 # other frozen copies (other initial cores)
    save_adapter(other, tmp_path / "a.safetensors")
    load_adapter(model, tmp_path / "a.safetensors", base_mismatch="ignore")
    static(batches, rng)
    assert static.captures == 1 and not static.captured_last_call
    static(batches, rng)
    assert static.captures == 2 and static.captured_last_call
    static(batches, rng)
    assert static.captures == 2
    model.to(memory_format=torch.channels_last_3d)     # new storage for every conv weight
    static(batches, rng)
    static(batches, rng)
    assert static.captures == 3


def test_a_short_batch_gets_its_own_buffers_and_matches_eager():
    """An epoch's short last batch: its own buffers (the captured ones stay valid), the same
    losses and parameters as the eager step, and the full-size step is not captured again."""
    def uneven():
        g, k = torch.Generator().manual_seed(3), 0
        while True:
            k += 1
            yield torch.rand(1 if k % 3 == 0 else 2, 1, 16, 16, 16, generator=g)
    eager_model = _model()
    static_model = copy.deepcopy(eager_model)
    inferer, eager_opt = _parts(eager_model)
    _, static_opt = _parts(static_model)
    static = StaticStep(static_model, inferer, static_opt, NO_AMP, 2, CPU, warmup=1)
    eager_rng, static_rng = (torch.Generator().manual_seed(7) for _ in range(2))
    eager_batches, static_batches = uneven(), uneven()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(6):
        expected = optimizer_step(eager_model, eager_batches, inferer, eager_opt, scaler, NO_AMP,
                                  2, CPU, 1, eager_rng)
        assert static(static_batches, static_rng) == expected
    for a, b in zip(eager_model.parameters(), static_model.parameters()):
        assert torch.equal(a, b)


def test_finetune_graph_matches_eager(tmp_path):
    common = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
              "--accum", "2", "--steps", "4", "--method", "tenvoo-l", "--count-launches"]
    assert main([*common, "--graph", "--out", str(tmp_path / "graph")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    graph = json.loads((tmp_path / "graph" / "metrics.json").read_text())
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    assert graph["graph"] is True and eager["graph"] is False
    assert graph["losses"] == eager["losses"] and graph["val_loss"] == eager["val_loss"]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "graph" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "eager" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,message", [(["--compile"], "choose one"),
                                           (["--amp", "fp16"], "--amp")])
def test_graph_refuses_what_it_cannot_capture(tmp_path, extra, message, capsys):
    assert main(["finetune", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--graph",
                 *extra, "--out", str(tmp_path / "x")]) != 0
    assert message in capsys.readouterr().err


def test_finetune_channels_last_trains_like_contiguous(tmp_path):
    """--channels-last (what cuDNN's 3-D convs want) trains the same model: the conv weights
    change layout, the losses agree to conv rounding, the adapter file has the same tensors."""
    common = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
              "--accum", "1", "--steps", "3", "--method", "tenvoo-l", "--graph"]
    assert main([*common, "--channels-last", "--out", str(tmp_path / "cl")]) == 0
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    cl = json.loads((tmp_path / "cl" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert cl["channels_last"] is True and plain["channels_last"] is False
    for a, b in zip(cl["losses"], plain["losses"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "cl" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
