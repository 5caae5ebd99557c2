"""The device-work counter (flops, bytes, roofline) and the committed step model it feeds."""
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tenvoo_fast.measure.roofline import H100, DeviceWork

ROOT = Path(__file__).resolve().parents[2]


def test_a_conv_counts_its_flops_bytes_and_roofline():
    x = torch.randn(1, 4, 6, 6, 6, device="meta")
    w = torch.randn(8, 4, 3, 3, 3, device="meta")
    with DeviceWork(H100) as work:
        y = F.conv3d(x, w, padding=1)
    assert y.device.type == "meta" and work.kernels == 1
    assert work.flops == 2 * 8 * 4 * 27 * 6 ** 3                 # 2 per multiply-add
    assert work.bytes == 4 * (x.numel() + w.numel() + y.numel())
    conv = work.by_op["convolution"]
    assert conv[:3] == [1, work.flops, work.bytes]
    assert work.roofline_s == max(work.flops / H100.fp32_flops, work.bytes / H100.bytes_per_s,
                                  H100.kernel_floor_s)


def test_views_are_free_and_bf16_uses_the_tensor_cores():
    a = torch.randn(64, 64, device="meta", dtype=torch.bfloat16)
    with DeviceWork(H100) as work:
        a.t()
        a.reshape(-1)
        a @ a
    assert work.kernels == 1 and work.flops == 2 * 64 ** 3
    assert work.by_op["mm"][3] == max(work.flops / H100.bf16_flops,
                                      work.bytes / H100.bytes_per_s, H100.kernel_floor_s)


def test_the_committed_step_model_is_what_the_script_computes(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/step_model.py", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    committed = ROOT / "benchmarks" / "results" / "step-model-2026-12-07"
    assert json.loads((tmp_path / "step-model.json").read_text()) == json.loads(
        (committed / "step-model.json").read_text())
