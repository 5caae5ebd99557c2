"""Build and install tenvoo_fast.

The top-level ``triton_kernels/`` directory is installed as the subpackage
``tenvoo_fast.triton_kernels`` (a top-level ``triton_kernels`` would clash with an unrelated PyPI
package). Native extensions from ``csrc/`` are added by the native-kernels issue; until then
the package is pure Python. torch is a runtime dependency and deliberately not a build
dependency, so that installing never pulls a second (CUDA) build of torch: install the torch you
want first (a CPU build: ``pip install torch==2.13.0`` on the project machines), then
``pip install --no-build-isolation -e .[test]``.
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    packages=["tenvoo_fast", "tenvoo_fast.modules", "tenvoo_fast.triton_kernels"],
    package_dir={"tenvoo_fast": "tenvoo_fast", "tenvoo_fast.triton_kernels": "triton_kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "opt_einsum>=3.3",
        "safetensors>=0.4",
        "monai>=1.4",
        "einops",  # MONAI's attention blocks import it
        "nibabel",  # NIfTI data for finetune --data and sample's outputs
        "tqdm",
        "matplotlib",  # profile and sample plots
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "triton": ["triton>=3.0"],
        "peers": ["peft", "lycoris-lora"],
    },
    entry_points={"console_scripts": ["tenvoo-fast=tenvoo_fast.cli:main"]},
)
