"""``tenvoo-fast check-kernels``: compile every GPU kernel ahead of time, without a GPU.

Triton: each kernel is compiled (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``) in every
configuration the dispatch can launch: each constexpr combination and each dtype of the weight,
the base weight and dL/dW, for each requested architecture. This catches what the interpreter
cannot (dot shape rules, layouts, shared-memory limits). CUDA: every ``.cu`` file under
``csrc/`` is compiled by nvcc (compile only, with setup.py's flags) for each architecture, and
the CUDA extension's host files are checked by g++ against torch's headers;
without nvcc, or outside a source checkout, those lines say ``skipped`` and why. One line per
kernel configuration (or file) and architecture; the exit status is non-zero if any failed.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: The source tree's csrc/ (present in a checkout or an editable install).
CSRC = Path(__file__).resolve().parents[2] / "csrc"

DTYPES = ("fp32", "bf16", "fp16")


def configurations():
    """(name, kernel, signature, constexprs) for every configuration the launchers use."""
    from ..triton_kernels import last_step as k
    blocks = dict(BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)
    ints = dict(M="i32", N="i32", K="i32", scale="fp32")
    for effective, frozen, scaled, dt in itertools.product((False, True), (False, True),
                                                          (False, True), DTYPES):
        if not effective and (frozen or dt != "fp32"):
            continue  # ΔW alone is always fp32, without a frozen copy
        sig = dict(left="*fp32", right="*fp32", off_b="*i64", off_m="*i64", off_n="*i64",
                   base=f"*{dt}", frozen="*fp32", out=f"*{dt}", **ints,
                   **{n: "i32" for n in ("l_b", "l_m", "l_k", "r_b", "r_k", "r_n")},
                   EFFECTIVE="constexpr", HAS_FROZEN="constexpr", HAS_SCALE="constexpr",
                   **{b: "constexpr" for b in blocks})
        consts = dict(EFFECTIVE=effective, HAS_FROZEN=frozen, HAS_SCALE=scaled, **blocks)
        name = (f"build_kernel[{'effective' if effective else 'delta'}"
                f"{',frozen' if frozen else ''}{',scale' if scaled else ''},{dt}]")
        yield name, k.build_kernel, sig, consts
    strides = {n: "i32" for n in ("l_b", "l_m", "l_k", "r_b", "r_k", "r_n", "gl_b", "gl_m",
                                  "gl_k", "gr_b", "gr_k", "gr_n")}
    for scaled, dt in itertools.product((False, True), DTYPES):
        sig = {"grad": f"*{dt}", "left": "*fp32", "right": "*fp32", "off_b": "*i64",
               "off_m": "*i64", "off_n": "*i64", "grad_left": "*fp32", "grad_right": "*fp32",
               **ints, **strides, "HAS_SCALE": "constexpr", **{b: "constexpr" for b in blocks}}
        consts = dict(HAS_SCALE=scaled, **blocks)
        yield f"grads_kernel[{'scale,' if scaled else ''}{dt}]", k.grads_kernel, sig, consts


def tree_configurations():
    """(name, kernel, signature, constexprs) of the one-launch contraction-tree kernel."""
    from ..triton_kernels import tree as k
    consts = dict(ROW=k.ROW, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K,
                  BLOCK_COPY=k.BLOCK_COPY)
    regions = ["saved", "scratch"] + [f"{p}{i}" for p in "cg" for i in range(k.MAX_CORES)]
    sig = dict(code="*i64", start="i32", stop="i32", **{r: "*fp32" for r in regions},
               **{c: "constexpr" for c in consts})
    yield "tree_kernel", k.tree_kernel, sig, consts


#: Conv geometries compiled for the implicit-GEMM kernels (the DDPM's): (kernel, stride, pad).
CONV_GEOMETRIES = {"3x3x3": (3, 1, 1), "3x3x3/stride2": (3, 2, 1), "1x1x1": (1, 1, 0)}


def conv_configurations():
    """(name, kernel, signature, constexprs) of the implicit-GEMM conv kernels: every compute
    dtype with a frozen copy and a bias on 3x3x3 convs, and the other geometries in bf16 with
    the base weight in the compute dtype, without a frozen copy or a bias."""
    from ..triton_kernels import implicit_conv as k
    cases = [(dt, "fp32", True, True, "3x3x3") for dt in DTYPES]
    cases += [("bf16", "bf16", False, False, g) for g in CONV_GEOMETRIES if g != "3x3x3"]
    for dt, base_dt, frozen, bias, geometry in cases:
        size, stride, pad = CONV_GEOMETRIES[geometry]
        consts = {f"{p}{a}": v for p, v in (("K", size), ("S", stride), ("P", pad), ("D", 1))
                  for a in "DHW"}
        consts.update(HAS_FROZEN=frozen, HAS_BIAS=bias, UPCAST=False, BLOCK_M=k.BLOCK_M,
                      BLOCK_N=k.BLOCK_N, BLOCK_C=k.BLOCK_C, BLOCK_K=k.BLOCK_K, BLOCK_V=k.BLOCK_V,
                      BLOCK_CI=k.BLOCK_C, BLOCK_CO=k.BLOCK_N)
        # Pointer element types by argument name.
        types = dict(x=dt, y=dt, dy=dt, dx=dt, base=base_dt, bias=base_dt, scale="fp32",
                     **{n: "*i64" for n in ("p_ci", "p_tap", "q_co", "q_tap")})
        pointers = {"x", "y", "dy", "dx", "base", "bias", "P", "Q", "P0", "Q0", "dP", "dQ"}
        tag = f"{dt},base {base_dt}{',frozen' if frozen else ''}{',bias' if bias else ''},{geometry}"
        for fn, name in ((k.conv_fwd_kernel, f"conv_fwd_kernel[{tag}]"),
                         (k.conv_dgrad_kernel, f"conv_dgrad_kernel[{tag}]"),
                         (k.conv_wgrad_kernel, f"conv_wgrad_kernel[{dt},{geometry}]")):
            yield (name, fn, *_signature(fn, consts, pointers, types))


def factorized_configurations():
    """(name, kernel, signature, constexprs) of the fused factorized conv's maps: the
    projection and outer product in every dtype with a frozen copy at each rank tile the
    launchers use (16, 64 and the largest, with their voxel tiles), the expansion in every
    dtype, and fp32 without a frozen copy."""
    from ..triton_kernels import factorized_conv as k
    pointers = {"A", "Mat", "Mat0", "Z", "Z0", "Y", "out"}
    cases = [(fn, dt, True, r) for fn in (k.project_kernel, k.outer_kernel) for dt in DTYPES
             for r in (16, 64, k.MAX_BLOCK_R)]
    cases += [(k.expand_kernel, dt, True, None) for dt in DTYPES]
    cases += [(k.project_kernel, "fp32", False, 64), (k.expand_kernel, "fp32", False, None)]
    for fn, dt, frozen, rank in cases:
        tiles = k.rank_tiles(rank) if rank else dict(BLOCK_R=k.BLOCK_R, BLOCK_M=k.BLOCK_M)
        consts = dict(dict(BLOCK_M=k.BLOCK_M, BLOCK_C=k.BLOCK_C, BLOCK_N=k.BLOCK_N,
                           BLOCK_V=k.BLOCK_V), HAS_FROZEN=frozen, **tiles)
        sig, used = _signature(fn, consts, pointers, dict(A=dt, Y=dt, scale="fp32"))
        tag = f"{dt}{',frozen' if 'HAS_FROZEN' in used and frozen else ''},rank tile {used['BLOCK_R']}"
        yield f"{fn.__name__}[{tag}]", fn, sig, used


def _signature(fn, consts, pointers, types):
    """(signature, constexprs) of ``fn`` from its argument names: constexprs from ``consts``;
    pointers (``pointers``) to ``types[name]`` (else fp32); other scalars by ``types``, else
    i64 for strides (three letters starting with s) and i32."""
    sig, used = {}, {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg], used[arg] = "constexpr", consts[arg]
        elif arg in pointers:
            sig[arg] = "*" + types.get(arg, "fp32")
        elif arg in types:
            sig[arg] = types[arg]
        else:
            sig[arg] = "i64" if arg.startswith("s") and len(arg) == 3 else "i32"
    return sig, used


def compile_one(fn, signature, constexprs, arch: int):
    """Compile ``fn`` for sm_``arch`` with the launch options of its module's launchers."""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    warps = importlib.import_module(fn.fn.__module__).NUM_WARPS
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, enable_fp_fusion=False))


def resource_usage(compiled) -> str:
    """Registers and stack (spills) per thread of a compiled kernel, from cuobjdump (Triton's
    bundled one, or one on PATH); empty if there is none."""
    import re
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if tool is None or "cubin" not in compiled.asm:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    return f"{m.group(1)} regs, {m.group(2)} B stack" if m else ""


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not found and home and (Path(home) / "bin" / "nvcc").exists():
        found = str(Path(home) / "bin" / "nvcc")
    return found


def compile_cu(path: Path, arch: int, compiler: str) -> str | None:
    """nvcc -c ``path`` for sm_``arch``; None on success, else the last error line."""
    from .._build_flags import NVCC_FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [compiler, "-std=c++17", *NVCC_FLAGS, f"-I{CSRC / 'include'}", "-c", str(path),
               "-o", os.path.join(tmp, "k.o"), "-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if "error" in l] or \
        (proc.stderr + proc.stdout).splitlines() or [f"nvcc exited {proc.returncode}"]
    return lines[0].strip()


def check_cuda_binding(path: Path, compiler: str) -> str | None:
    """g++ -fsyntax-only of a CUDA extension's host file against torch's headers (a CPU
    torch lacks one generated CUDA header, which is stubbed); None on success."""
    import sysconfig

    from torch.utils import cpp_extension
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             str(Path(compiler).resolve().parents[1]), "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes
                         if h and (Path(h) / "include" / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        return "cuda_runtime.h not found (set CUDA_HOME)"
    with tempfile.TemporaryDirectory() as tmp:
        includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"],
                    str(cuda_include),
                    str(CSRC / "include")]
        if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in includes):
            stub = Path(tmp) / "c10/cuda/impl/cuda_cmake_macros.h"
            stub.parent.mkdir(parents=True)
            stub.write_text("#pragma once\n")
            includes.insert(0, tmp)
        cmd = ["g++", "-fsyntax-only", "-std=c++20", *[f"-I{d}" for d in includes],
               "-DTORCH_EXTENSION_NAME=_C_cuda", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [l for l in proc.stderr.splitlines() if "error" in l] or [f"g++ exited {proc.returncode}"]
    return lines[0].strip()


def run_cuda(archs: list[int]) -> int:
    """Compile every csrc .cu file for ``archs``; one line each; return the failures."""
    files = sorted(CSRC.rglob("*.cu")) if CSRC.is_dir() else []
    compiler = nvcc()
    if not files or compiler is None:
        why = "nvcc not found (set CUDA_HOME)" if files else "no csrc/ here (a source checkout has it)"
        for arch in archs:
            print(f"skipped sm_{arch}  csrc/**/*.cu: {why}", flush=True)
        return 0
    failures = 0
    for path, arch in itertools.product(files, archs):
        err = compile_cu(path, arch, compiler)
        name = path.relative_to(CSRC.parent)
        print(f"ok      sm_{arch}  {name}" if err is None else f"failed  sm_{arch}  {name}: {err}",
              flush=True)
        failures += err is not None
    for path in sorted((CSRC / "cuda").glob("*.cpp")):
        err = check_cuda_binding(path, compiler)
        name = path.relative_to(CSRC.parent)
        print(f"ok      host   {name}" if err is None else f"failed  host   {name}: {err}",
              flush=True)
        failures += err is not None
    return failures


def run(archs: list[int]) -> int:
    """Compile everything for ``archs``; print one line each; return the number of failures."""
    failures = run_cuda(archs)
    for name, fn, sig, consts in itertools.chain(configurations(), tree_configurations(),
                                                 conv_configurations(),
                                                 factorized_configurations()):
        for arch in archs:
            try:
                compiled = compile_one(fn, sig, consts, arch)
                usage = ", ".join(filter(None, (f"{compiled.metadata.shared} B shared",
                                                resource_usage(compiled))))
                print(f"ok      sm_{arch}  {name} ({usage})", flush=True)
            except Exception as e:  # report every failure, then exit non-zero
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"failed  sm_{arch}  {name}: {msg[-1] if msg else type(e).__name__}",
                      flush=True)
    return failures
