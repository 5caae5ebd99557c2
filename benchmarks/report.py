"""Turn a pytest-benchmark JSON file into a markdown table of per-layer ratios.

Usage: python benchmarks/report.py results.json > table.md

Within each shape, times are given as the median and as ratios to the reference backend of the
same adapter and to the trainable plain layer (Conv3d or Linear, full fine-tuning); ``saved`` is what autograd keeps for backward
beyond the input and the layer's own tensors, as a fraction of the weight's size; ``peak``
(CUDA only) is the allocator's peak during one step above what was allocated before it.
"""
import json
import sys


def main(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        rows[(e["shape"], e["method"], e["backend"])] = (b["stats"]["median"], e)
    machine = data.get("machine_info", {})
    ours = data.get("tenvoo_fast", {})
    out = [f"Device: {ours.get('device', '?')}, "
           f"{machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}; "
           f"versions {ours.get('versions', {})}; {data.get('datetime', '')}", "",
           "| shape | method | backend | median ms | vs reference | vs trainable layer | saved / W "
           "| peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for (shape, method, backend), (t, e) in sorted(rows.items()):
        ref = rows.get((shape, method, "reference"))
        full = (rows.get((shape, "trainable-conv", "torch"))
                or rows.get((shape, "trainable-linear", "torch")))
        vs_ref = f"{t / ref[0]:.2f}x" if ref and method.startswith(("tenvoo", "quanta")) else ""
        vs_full = f"{t / full[0]:.2f}x" if full else ""
        saved = e["saved_bytes"] / e["weight_bytes"]
        name = backend + (f" ({e['resolved']})" if e.get("resolved") and backend != e["resolved"] else "")
        peak = f"{e['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in e else ""
        out.append(f"| {shape} | {method} | {name} | {t * 1e3:.1f} | {vs_ref} | {vs_full} | "
                   f"{saved:.3f} | {peak} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(main(sys.argv[1]))
