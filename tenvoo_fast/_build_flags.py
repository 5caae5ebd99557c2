"""Compiler flags of the native kernels, shared by setup.py and ``check-kernels``.

No FMA contraction: the fused epilogue ``base + (scale*T - T0)`` must round like every other
path, so that a frozen-copy layer reproduces its base layer exactly at initialisation.
"""
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
