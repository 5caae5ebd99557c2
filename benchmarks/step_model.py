"""A step-time model for the paper DDPM on a GPU, calibrated against the committed H100 runs.

    predicted step = max(host, device)
    host   = launching calls x host seconds per call        (eager; the host issues them all)
    device = sum over op classes of roofline x inefficiency + the optimizer's roofline

The roofline of each op class (GroupNorm, convolutions, everything else) comes from counting
the paper model's step at 128x128x96 in bf16 on the meta device (``tenvoo_fast.measure.
roofline``); each class's inefficiency is the committed H100 trace's CUDA time for that class
(TenVOO-L, 2026-11-24) over its roofline; the host seconds per call is the one constant fitted
to the committed step times, over the launch counts measured for those configurations (issue
15's table). With ``--graph`` there is no per-call host cost, so the prediction is the device
term alone. Everything printed is a prediction except the columns marked measured.

    python benchmarks/step_model.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

import tenvoo_fast as tf
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.measure.roofline import H100, DeviceWork
from tenvoo_fast.model import AdapterConfig, inject

ROOT = Path(__file__).resolve().parent
H100_RUNS = ROOT / "results" / "h100-2026-11-24"
#: (label, method, backend on the meta count, launch-counted calls per step (issue 15's
#: table, counted with the launch counter at the H100 runs' code), measured H100 step times
#: in seconds (profile.json of the committed runs)).
MEASURED = [
    ("full", "full", None, 2916, [("paper-profile", "full"),
                                  ("run2/paper-profile-triton", "full")]),
    ("LoRA, reference", "lora", "reference", 3164, [("paper-profile", "lora")]),
    ("TenVOO-L, reference", "tenvoo-l", "reference", 6915,
     [("paper-profile-reference-backend", "tenvoo-l")]),
    ("TenVOO-L, recompute (torch)", "tenvoo-l", "reference", 10784,
     [("paper-profile", "tenvoo-l")]),
    ("TenVOO-L, triton", "tenvoo-l", "reference", 10001,
     [("run2/paper-profile-triton", "tenvoo-l")]),
]
#: The traced configuration (TenVOO-L, recompute) and its trace's op-name -> class.
TRACE = H100_RUNS / "paper-trace-tenvoo-l" / "profile.txt"
CLASSES = {"native_group_norm": "groupnorm", "native_group_norm_backward": "groupnorm",
           "cudnn_convolution": "conv", "convolution": "conv", "convolution_backward": "conv"}
ADAM_BYTES_PER_PARAM = 7 * 4       # fused Adam: read param, grad, m, v; write param, m, v
#: Today's code: the launch counts committed under results/launch-counts-cpu-2026-12-07.
COUNTS_NOW = ROOT / "results" / "launch-counts-cpu-2026-12-07" / "launch-counts.json"
NOW = [("full", "full", None, "full"),
       ("TenVOO-L, triton", "tenvoo-l", "reference", "tenvoo-l:triton:merged"),
       ("TenVOO-Q, triton", "tenvoo-q", "reference", "tenvoo-q:triton:merged")]


def measured_step(folder: str, method: str) -> float:
    rows = json.loads((H100_RUNS / folder / "profile.json").read_text())["rows"]
    return next(r["step_time_s"] for r in rows if r["method"] == method)


def trace_classes() -> dict[str, float]:
    """CUDA seconds per step per class in the committed TenVOO-L trace."""
    text = TRACE.read_text()
    steps = int(re.search(r"(\d+) optimizer step", text).group(1))
    total = float(re.search(r"Self CUDA time total: ([\d.]+)ms", text).group(1)) / 1e3
    out = {"groupnorm": 0.0, "conv": 0.0, "optimizer": 0.0}
    for line in text.splitlines():
        name = line[:55].strip()
        fields = re.split(r"\s{2,}", line[55:].strip())
        if len(fields) < 6 or not re.match(r"[\d.]+(ms|us|s)$", fields[5]):
            continue
        value = float(re.match(r"[\d.]+", fields[5]).group())
        value *= {"ms": 1e-3, "us": 1e-6}.get(re.search(r"(ms|us|s)$", fields[5]).group(), 1)
        key = CLASSES.get(name.removeprefix("aten::"))
        if key is not None:
            out[key] += value
        elif name.startswith("Optimizer.step"):
            out["optimizer"] += value
    out = {k: v / steps for k, v in out.items()}
    out["other"] = total / steps - sum(out.values())
    return out


def roofline(method: str, backend: str | None) -> tuple[dict[str, float], int, int]:
    """Per class roofline seconds of one forward+backward on the meta device, and the
    trainable parameters and tensors (for the optimizer)."""
    with torch.device("meta"):
        model = build_unet("paper")
    if method != "full":
        defaults = FinetuneOptions()
        inject(model, AdapterConfig(method=method, rank=4, target_modules=list(defaults.targets),
                                    trainable=tuple(defaults.trainable)))
    model.to(torch.bfloat16)      # autocast's bf16 activations (GroupNorm runs fp32 there)
    x = torch.randn(1, 1, 128, 128, 96, device="meta", dtype=torch.bfloat16)
    with tf.use_backend(backend or "reference"), DeviceWork(H100) as work:
        model(x, torch.tensor([10], device="meta")).float().square().mean().backward()
    classes = {"groupnorm": 0.0, "conv": 0.0, "other": 0.0}
    for name, (_, _, _, seconds) in work.by_op.items():
        classes[CLASSES.get(name, "other")] += seconds
    trainable = [p for p in model.parameters() if p.requires_grad]
    return classes, sum(p.numel() for p in trainable), len(trainable)


def optimizer_roofline(params: int, tensors: int) -> float:
    """Fused Adam: its bytes at full bandwidth, plus one kernel floor per 100 tensors."""
    return params * ADAM_BYTES_PER_PARAM / H100.bytes_per_s + H100.kernel_floor_s * tensors / 100


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    traced = trace_classes()
    roofs = {(m, b): roofline(m, b) for _, m, b, _, _ in MEASURED}
    roofs.update({(m, b): roofline(m, b) for _, m, b, _ in NOW if (m, b) not in roofs})
    traced_roof, _, _ = roofs[("tenvoo-l", "reference")]
    inefficiency = {k: traced[k] / traced_roof[k] for k in traced_roof}
    rows = []
    for label, method, backend, calls, runs in MEASURED:
        classes, params, tensors = roofs[(method, backend)]
        device = sum(classes[k] * inefficiency[k] for k in classes)
        device += optimizer_roofline(params, tensors)
        rows.append(dict(label=label, calls=calls, device_s=device,
                         measured_s=[measured_step(f, m) for f, m in runs]))
    # The one host constant: the median of each configuration's measured step per call.
    per_call = statistics.median(min(r["measured_s"]) / r["calls"] for r in rows)
    for r in rows:
        r["host_s"] = r["calls"] * per_call
        r["predicted_s"] = max(r["host_s"], r["device_s"])
        r["error"] = [r["predicted_s"] / m - 1 for m in r["measured_s"]]
    counted = {r["config"]: r["step"]["launches"]
               for r in json.loads(COUNTS_NOW.read_text())["rows"]}
    now = []
    for label, method, backend, config in NOW:
        classes, params, tensors = roofs[(method, backend)]
        device = sum(classes[k] * inefficiency[k] for k in classes) + optimizer_roofline(
            params, tensors)
        calls = counted[config]
        now.append(dict(label=label, calls=calls, eager_s=max(calls * per_call, device),
                        graph_s=device))
    result = dict(gpu=H100.name, host_s_per_call=per_call, inefficiency=inefficiency,
                  traced_cuda_s_per_step=traced, rows=rows, now=now)
    lines = [f"Host seconds per launching call (fitted): {per_call * 1e6:.0f} µs. Inefficiency "
             "(traced CUDA time / roofline), per class: "
             + ", ".join(f"{k} {v:.1f}x" for k, v in inefficiency.items()) + ".", "",
             "| configuration | launching calls | predicted host (ms) | predicted device (ms) "
             "| predicted step (ms) | measured step (ms) | error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['calls']:,} | {r['host_s'] * 1e3:.0f} | "
                     f"{r['device_s'] * 1e3:.0f} | {r['predicted_s'] * 1e3:.0f} | "
                     + ", ".join(f"{m * 1e3:.0f}" for m in r["measured_s"]) + " | "
                     + ", ".join(f"{e:+.0%}" for e in r["error"]) + " |")
    full = now[0]["eager_s"]
    lines += ["", "Today's code (launch counts of 2026-12-07), predicted, not measured:", "",
              "| configuration | launching calls | eager step (ms) | --graph step (ms) "
              "| --graph vs full eager |", "|---|---:|---:|---:|---:|"]
    for r in now:
        lines.append(f"| {r['label']} | {r['calls']:,} | {r['eager_s'] * 1e3:.0f} | "
                     f"{r['graph_s'] * 1e3:.0f} | {r['graph_s'] / full:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step-model.json").write_text(json.dumps(result, indent=1))
        (args.out / "step-model.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
