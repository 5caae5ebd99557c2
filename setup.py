"""Build and install tenvoo_fast.

The adapter library needs torch, numpy, opt_einsum and safetensors; the 3D DDPM program
(``tenvoo-fast``) the ``ddpm`` extra; the test suite the ``test`` extra. The top-level
``triton_kernels/`` directory is installed as the subpackage ``tenvoo_fast.triton_kernels``.
The native kernels in ``csrc/`` are built where they can be:
``TENVOO_FAST_BUILD_CPU`` and ``TENVOO_FAST_BUILD_CUDA`` (``auto``, ``0`` or ``1``) skip or force
each extension (csrc/README.md). torch is a runtime dependency and deliberately not a build
dependency, so that installing never pulls a second (CUDA) build of torch: install the torch you
want first (a CPU build: ``pip install torch==2.13.0`` on the project machines), then
``pip install --no-build-isolation -e .[test]``.
"""
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_build_flags():
    """CXX_FLAGS, NVCC_FLAGS from tenvoo_fast/_build_flags.py (shared with check-kernels)."""
    scope = {}
    with open(os.path.join(HERE, "tenvoo_fast", "_build_flags.py")) as f:
        exec(f.read(), scope)
    return scope["CXX_FLAGS"], scope["NVCC_FLAGS"]


CXX_FLAGS, NVCC_FLAGS = read_build_flags()


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"{name}={value!r}: use auto, 0 or 1")
    return value


def _say(msg: str) -> None:
    print(f"tenvoo_fast setup: {msg}", file=sys.stderr)


def native_extensions():
    """(extensions, cmdclass) for the csrc kernels this machine can build."""
    want_cpu, want_cuda = _flag("TENVOO_FAST_BUILD_CPU"), _flag("TENVOO_FAST_BUILD_CUDA")
    if want_cpu == "0" and want_cuda == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if "1" in (want_cpu, want_cuda):
            sys.exit("native kernels forced but torch cannot be imported at build time: install "
                     "torch first and build with --no-build-isolation")
        _say("torch not importable at build time: no native kernels (use --no-build-isolation)")
        return [], {}
    include = [os.path.join(HERE, "csrc", "include")]
    exts = []
    if want_cpu != "0":
        exts.append(CppExtension(
            "tenvoo_fast._C", ["csrc/ops.cpp", "csrc/run_program.cpp", "csrc/merged_layer.cpp",
             "csrc/cpu/last_step_cpu.cpp"],
            include_dirs=include, extra_compile_args={"cxx": CXX_FLAGS}))
    if want_cuda != "0":
        why = None
        if not torch.version.cuda:
            why = "torch has no CUDA"
        elif not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
            why = "nvcc not found"
        if why and want_cuda == "1":
            sys.exit(f"TENVOO_FAST_BUILD_CUDA=1 but {why}")
        if why:
            _say(f"{why}: CUDA kernels not built (the cpu extension still is)")
        else:
            if os.environ.get("TENVOO_FAST_CUDA_ARCH"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["TENVOO_FAST_CUDA_ARCH"]
            exts.append(CUDAExtension(
                "tenvoo_fast._C_cuda", ["csrc/cuda/bind_cuda.cpp", "csrc/cuda/last_step_cuda.cu"],
                include_dirs=include,
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}))
    return exts, {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = native_extensions()

#: The library's subpackages (the top-level triton_kernels/ is installed as
#: tenvoo_fast.triton_kernels: a top-level ``triton_kernels`` would clash with a PyPI package).
PACKAGES = ["tenvoo_fast", *(f"tenvoo_fast.{p}" for p in (
    "contraction", "methods", "ops", "kernels", "dispatch", "nn", "model", "measure", "ddpm",
    "triton_kernels"))]
#: The 3D DDPM fine-tuning program (``tenvoo-fast``): ``pip install 'tenvoo_fast[ddpm]'``.
FEDERATED = ["flwr[simulation]>=1.21"]
DDPM = [
    "monai>=1.4",
    "einops",  # MONAI's attention blocks import it
    "nibabel",  # NIfTI data for finetune --data and sample's outputs
    "tqdm",
    "matplotlib",  # profile and sample plots
]


def read_version():
    with open(os.path.join(HERE, "tenvoo_fast", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="tenvoo_fast",
    version=read_version(),
    description="Fused tensor-network adapters (TenVOO, QuanTA) and baselines for 3D conv nets",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"tenvoo_fast": "tenvoo_fast", "tenvoo_fast.triton_kernels": "triton_kernels"},
    # The adapter library: `import tenvoo_fast` needs only these (numpy: adapter files'
    # base fingerprint, the contraction programs' gather indices).
    install_requires=[
        "torch>=2.4",
        "numpy",
        "opt_einsum>=3.3",
        "safetensors>=0.4",
    ],
    extras_require={
        "ddpm": DDPM,
        # Everything the suite runs: the DDPM program, triton (the interpreter and
        # ahead-of-time checks of the GPU kernels), scipy (MONAI's FID), the peers the
        # adapters are checked against, and pytest-xdist (the suite on every core).
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "triton>=3.2", "scipy",
                 "peft", "lycoris-lora", *DDPM, *FEDERATED],
        "triton": ["triton>=3.2"],
        # tenvoo-fast federated: Flower, with its simulation engine (Ray).
        "federated": [*DDPM, *FEDERATED],
        "peers": ["peft", "lycoris-lora"],
    },
    entry_points={"console_scripts": ["tenvoo-fast=tenvoo_fast.ddpm.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
