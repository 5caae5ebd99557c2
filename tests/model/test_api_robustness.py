"""The model API under less common conditions: inference mode, low-precision models, the meta
device, bad save paths and memory checks."""
import os

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast import AdapterError, QuanTALinear, TenVOOConv3d

FAST = [b for b in tf.available_backends() if b not in ("reference", "auto")]


def _combos(strategies):
    """(backend, strategy) pairs: the reference once, every fast backend with each strategy."""
    return [("reference", "auto"), ("auto", "auto")] + [(b, s) for b in FAST for s in strategies]


# -- 1. inference mode leaves nothing that breaks training ---------------------------------------
def _train(layer, x, steps=2):
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        layer(x.clone().requires_grad_(True)).square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend,strategy", _combos(["merged", "factorized"]))
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_inference_mode_forward_does_not_break_training(kind, backend, strategy, seeded):
    """One forward under torch.inference_mode must not leave an inference tensor in the layer's
    T(θ0) cache or in the process-wide scratch pool: training that layer, and a second fresh
    layer of the same shape, must work afterwards."""
    if kind == "conv":
        layers = [TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), rank=2)
                  for _ in range(2)]
        x = torch.randn(1, 8, 4, 4, 3)
    else:
        layers = [QuanTALinear.from_linear(nn.Linear(8, 8), rank=2) for _ in range(2)]
        x = torch.randn(5, 8)
    with tf.use_backend(backend), tf.use_strategy(strategy):
        with torch.inference_mode():
            y_inf = layers[0](x)
        for layer in layers:
            _train(layer, x)
    assert y_inf.is_inference()


# -- 2. cores stay fp32 master weights under model.to(dtype) ---------------------------------------
def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.GroupNorm(2, 8),
                         nn.Conv3d(8, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 27, 8))


def _small_config():
    return tf.AdapterConfig("tenvoo-l", 2, [r"^0$", r"^2$", r"^4$"], trainable=("bias", "norm"))


def _adam_step(model, x):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    model(x).float().square().sum().backward()
    opt.step()


@pytest.mark.parametrize("backend", ["auto", "reference"] + FAST)
def test_model_to_bf16_keeps_cores_fp32(backend):
    """inject, then model.to(bf16): the cores and frozen copies stay fp32 (the same Parameter
    objects), the base layers become bf16, the untrained model equals the bf16 base model, and
    an Adam step at lr 5e-5 moves the cores exactly as for a layer built on a bf16 base (whose
    cores are fp32 from the start); in bf16 such a step would round away."""
    base = _small_model().to(torch.bfloat16)
    model = _small_model()
    torch.manual_seed(1)
    tf.inject(model, _small_config())
    cores = {n: list(m.cores) for n, m in tf.adapter_layers(model).items()}
    model.to(torch.bfloat16)
    reference = _small_model().to(torch.bfloat16)
    torch.manual_seed(1)
    tf.inject(reference, _small_config())
    for name, layer in tf.adapter_layers(model).items():
        assert [id(p) for p in layer.cores] == [id(p) for p in cores[name]]
        assert all(p.dtype == torch.float32 for p in layer.cores)
        assert all(t.dtype == torch.float32 for t in layer.frozen_cores)
        assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 8, 3, 3, 3, dtype=torch.bfloat16)
    with tf.use_backend(backend):
        assert torch.equal(model(x), base(x))
        before = [p.detach().clone() for p in model[0].cores]
        _adam_step(model, x)
        _adam_step(reference, x)
    for p, q, b in zip(model[0].cores, reference[0].cores, before):
        assert p.dtype == torch.float32 and torch.equal(p, q)
        assert 0 < (p - b).abs().max() < 1e-4   # an fp32-sized step of ~lr


@pytest.mark.parametrize("backend", ["auto", "reference"] + FAST)
def test_model_to_channels_last_3d(backend):
    """model.to(memory_format=torch.channels_last_3d) (what 3-D UNets use on GPUs) works on an
    injected model: conv weights change layout, cores and frozen copies (4-D, for which torch
    refuses that format) stay as they were, and the model computes the same."""
    model = _small_model()
    torch.manual_seed(1)
    tf.inject(model, _small_config())
    x = torch.randn(2, 8, 3, 3, 3)
    with tf.use_backend(backend):
        before = model(x)
        model.to(memory_format=torch.channels_last_3d)
        after = model(x.to(memory_format=torch.channels_last_3d))
    for layer in tf.adapter_layers(model).values():
        assert layer.weight.dim() == 2 or layer.weight.is_contiguous(
            memory_format=torch.channels_last_3d)
        assert all(p.is_contiguous() for p in layer.cores)
        assert all(t.is_contiguous() for t in layer.frozen_cores)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_model_double_and_back_follows_master_rule():
    """.double() makes fp64 cores (as injecting into an fp64 model does); .float() fp32 again;
    .half() keeps them fp32; .to(device) still moves them."""
    model = tf.inject(_small_model(), _small_config())
    layer = model[0]
    model.double()
    assert layer.cores[0].dtype == torch.float64 and layer.frozen_cores[0].dtype == torch.float64
    model.float()
    assert layer.cores[0].dtype == torch.float32
    model.half()
    assert layer.cores[0].dtype == torch.float32 and layer.weight.dtype == torch.float16
    model.to("meta")
    assert layer.cores[0].device.type == "meta" and layer.frozen_cores[0].device.type == "meta"


# -- 3. the meta device: shape-only forward, then to_empty + load -----------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference"] + FAST)
def test_meta_model_forward_is_shape_only(backend):
    """A model built and injected under torch.device("meta") runs forward and backward with the
    shapes and dtypes of the real model, whichever backend is selected."""
    from tests.ddpm_shapes import tiny_unet
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([10])
    real = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-q", 2))
    with torch.device("meta"):
        model = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-q", 2))
    with tf.use_backend(backend):
        y = model(x.to("meta"), t.to("meta"))
        y.sum().backward()
    assert y.device.type == "meta" and y.shape == real(x, t).shape and y.dtype == torch.float32
    layer = next(iter(tf.adapter_layers(model).values()))
    assert layer.cores[0].grad is not None and layer.cores[0].grad.device.type == "meta"
    assert layer.merged_weight().shape == layer.weight.shape


@pytest.mark.parametrize("inject_on_meta", [True, False])
def test_meta_to_empty_then_load_equals_normal_model(tmp_path, inject_on_meta):
    """Build under meta (inject there or not), check shapes with a meta forward, to_empty(cpu),
    load the base weights and the adapter: the output equals the normally built, trained
    model's exactly (nothing the meta forward computed survives)."""
    from tests.ddpm_shapes import tiny_unet
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([10])
    base_sd = tiny_unet().state_dict()
    trained = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-l", 2))
    _train_unet(trained, x, t)
    tf.save_adapter(trained, tmp_path / "a.safetensors")
    with torch.device("meta"):
        model = tiny_unet()
        if inject_on_meta:
            tf.inject(model, tf.presets.paper_ddpm("tenvoo-l", 2))
        assert model(x.to("meta"), t.to("meta")).shape == x.shape
    model.to_empty(device="cpu")
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys
    assert all(".cores." in k or ".frozen_cores." in k for k in result.missing_keys)
    tf.load_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(model(x, t), trained(x, t))


def _train_unet(model, x, t, steps=1):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(x, t).square().mean().backward()
        opt.step()
        opt.zero_grad()


# -- 4. save_adapter to a path that cannot be a file -------------------------------------------------
def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _adapted():
    return tf.inject(_small_model(), _small_config())


def test_save_adapter_to_a_folder_is_a_clear_error(tmp_path):
    model = _adapted()
    for path in (tmp_path, str(tmp_path) + "/", str(tmp_path / "new") + "/"):
        with pytest.raises(AdapterError, match="is a folder; give a file path such as .*"
                                               "adapter.safetensors") as e:
            tf.save_adapter(model, path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []   # nothing written, no "new" file or folder


def test_save_adapter_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file, not a folder") as e:
        tf.save_adapter(_adapted(), tmp_path / "file" / "sub" / "a.safetensors")
    assert str(tmp_path / "file") in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_save_adapter_to_a_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(AdapterError, match="no write permission"):
            tf.save_adapter(_adapted(), folder / "a.safetensors")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_save_adapter_write_failure_is_a_clear_error_and_leaves_no_temp_file(tmp_path,
                                                                              monkeypatch):
    """A write that fails half-way (disk full, read-only file system, or, for root, a folder
    it cannot really write) is one AdapterError naming the file, and the temporary file goes."""
    from tenvoo_fast.model import adapter_file as checkpoint

    def failing_save(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(AdapterError, match="cannot write .*a.safetensors .*No space left"):
        tf.save_adapter(_adapted(), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- 6. adapters that cannot fit are refused before anything is allocated ----------------------------
def _adapter_bytes(model):
    return sum(t.numel() * t.element_size() for m in tf.adapter_layers(model).values()
               for t in [*m.cores, *(m.frozen_cores or [])])


@pytest.mark.parametrize("method", ["tenvoo-l", "lora"])
def test_inject_refuses_adapters_larger_than_free_memory(method, monkeypatch):
    """The check counts exactly what injection allocates (cores and frozen copies, fp32): it
    passes with that many bytes free, and with one byte less refuses in one line, leaving the
    model untouched."""
    from tests.ddpm_shapes import tiny_unet
    from tenvoo_fast.model import memory as model_api
    config = tf.presets.paper_ddpm(method, 3)
    need = _adapter_bytes(tf.inject(tiny_unet(), config))
    asked = []
    monkeypatch.setattr(model_api, "available_memory",
                        lambda device: asked.append(torch.device(device)) or need - 1)
    model = tiny_unet()
    with pytest.raises(AdapterError, match=r"^rank 3: the adapters would allocate .* GiB "
                                           r"\((cores and frozen copies|cores) of \d+ layers\) "
                                           r"but only .* GiB are free on cpu; use a smaller rank "
                                           r"or fewer targets$"):
        tf.inject(model, config)
    assert asked == [torch.device("cpu")]
    assert not tf.adapter_layers(model) and tf.model.get_config(model) is None
    monkeypatch.setattr(model_api, "available_memory", lambda device: need)
    assert _adapter_bytes(tf.inject(tiny_unet(), config)) == need


def test_paper_rank_64_is_refused_fast(monkeypatch):
    """The paper preset at rank 64 (TenVOO cores grow as r^4: 17 GiB for 111 layers) on a
    machine with 16 GiB free: refused from the layer shapes alone (the model is on meta here,
    so nothing could be allocated anyway)."""
    import time
    from tests.ddpm_shapes import paper_unet
    from tenvoo_fast.model import memory as model_api
    monkeypatch.setattr(model_api, "available_memory", lambda device: 16 * 2**30)
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=r"rank 64: the adapters would allocate 17\.1 GiB "
                                           r"\(cores and frozen copies of 111 layers\) but only "
                                           r"16\.0 GiB are free on meta"):
        tf.inject(paper_unet("meta"), tf.presets.paper_ddpm("tenvoo-l", rank=64))
    assert time.perf_counter() - start < 30


def test_available_memory_reports_the_cpu():
    from tenvoo_fast.model import available_memory
    free = available_memory(torch.device("cpu"))
    assert free is not None and 0 < free
    assert available_memory(torch.device("meta")) is None
