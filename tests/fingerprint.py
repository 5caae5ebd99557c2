"""Behaviour fingerprint: the outputs, gradients and strides of every backend x strategy x method
x dtype on a fixed seed, through the public API only, so one script runs on two revisions and
shows whether a refactor changed any bit.

    git worktree add /tmp/old <revision>        # (copy the built tenvoo_fast/_C*.so into it)
    PYTHONPATH=/tmp/old python tests/fingerprint.py old.pt
    python tests/fingerprint.py new.pt
    python tests/fingerprint.py --compare old.pt new.pt     # exit 1 if any case differs

Refusals (a combination a layer cannot run) are recorded by exception type, so they must stay
refusals. Runs the Triton kernels in the interpreter (TRITON_INTERPRET=1) off a GPU.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from torch import nn

import tenvoo_fast as tf

torch.backends.cudnn.allow_tf32 = False


def conv_makers():
    return {
        "tenvoo-l": lambda c: tf.TenVOOConv3d.from_conv(c, 2, "L"),
        "tenvoo-q": lambda c: tf.TenVOOConv3d.from_conv(c, 2, "Q"),
        "lora": lambda c: tf.LoRAConv3d.from_conv(c, 3),
        "lora-bypass": lambda c: tf.LoRAConv3d.from_conv(c, 3, mode="bypass"),
        "loha": lambda c: tf.LoHaConv3d.from_conv(c, 3),
        "lokr": lambda c: tf.LoKrConv3d.from_conv(c, 3),
    }


def linear_makers():
    return {
        "quanta": lambda l: tf.QuanTALinear.from_linear(l, 2),
        "quanta-uneq": lambda l: tf.QuanTALinear.from_linear(l, 2, factors=((2, 2, 2), (3, 2, 1))),
        "lora": lambda l: tf.LoRALinear.from_linear(l, 3),
        "loha": lambda l: tf.LoHaLinear.from_linear(l, 3),
        "lokr": lambda l: tf.LoKrLinear.from_linear(l, 3),
    }


def perturb(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.cores:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def run(layer, x, backend, strategy, amp):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    if layer.bias is not None and not layer.bias.requires_grad:
        layer.bias.requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with tf.use_backend(backend), tf.use_strategy(strategy), ctx:
        y = layer(x)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *params], gy)
    return [y.detach()] + [t.detach() for t in grads]


#: Backends keyed by their earlier names, so revisions before a rename compare.
NAMES = {"torch": "recompute"}


def cases():
    backends = [b for b in tf.available_backends() if b != "auto"] + ["auto"]
    strategies = ["auto", "merged", "factorized", "implicit-gemm"]
    conv_shapes = [((6, 8, 3), (1, 6, 4, 3, 5)), ((8, 4, (3, 1, 3)), (2, 8, 3, 4, 3))]
    for mname, make in conv_makers().items():
        for (cin, cout, k), xs in conv_shapes:
            for dtype, amp in ((torch.float32, False), (torch.float64, False),
                               (torch.float32, True)):
                for b in backends:
                    for s in strategies:
                        yield ("conv", mname, cin, cout, k, str(dtype), amp, NAMES.get(b, b), s), \
                            (make, cin, cout, k, xs, dtype, amp, b, s)
    for mname, make in linear_makers().items():
        for dtype, amp in ((torch.float32, False), (torch.float64, False), (torch.float32, True)):
            for b in backends:
                for s in ("auto", "merged", "factorized"):
                    yield ("linear", mname, str(dtype), amp, NAMES.get(b, b), s), (make, dtype, amp, b, s)


def main(out):
    torch.manual_seed(0)
    results = {}
    for key, args in cases():
        torch.manual_seed(1234)
        try:
            if key[0] == "conv":
                make, cin, cout, k, xs, dtype, amp, b, s = args
                conv = nn.Conv3d(cin, cout, k, padding=1, dtype=dtype)
                layer = make(conv)
                perturb(layer, 3)
                x = torch.randn(xs, dtype=dtype)
            else:
                make, dtype, amp, b, s = args
                lin = nn.Linear(8, 6, dtype=dtype)
                layer = make(lin)
                perturb(layer, 3)
                x = torch.randn(2, 5, 8, dtype=dtype)
            results[key] = run(layer, x, b, s, amp)
        except Exception as e:   # record the error class: unsupported combos must stay so
            results[key] = f"{type(e).__name__}"
    torch.save(results, out)
    ok = sum(not isinstance(v, str) for v in results.values())
    print(f"{len(results)} cases, {ok} ran, {len(results) - ok} refused -> {out}")


def compare(a, b):
    ra, rb = torch.load(a), torch.load(b)
    assert ra.keys() == rb.keys(), set(ra) ^ set(rb)
    bad = 0
    for k in ra:
        va, vb = ra[k], rb[k]
        if isinstance(va, str) or isinstance(vb, str):
            if va != vb:
                bad += 1
                print("DIFF", k, va if isinstance(va, str) else "ran",
                      vb if isinstance(vb, str) else "ran")
            continue
        same = len(va) == len(vb) and all(
            x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
            and torch.equal(x.view(-1) if x.is_contiguous() else x.contiguous().view(-1),
                            y.view(-1) if y.is_contiguous() else y.contiguous().view(-1))
            for x, y in zip(va, vb))
        if not same:
            bad += 1
            print("DIFF", k)
    n_ran = sum(not isinstance(v, str) for v in ra.values())
    print(f"{len(ra)} cases ({n_ran} ran): {bad} differ")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    main(sys.argv[1])
