"""Triton kernels for tenvoo_fast, installed as ``tenvoo_fast.triton_kernels``.

- :mod:`.last_step`: the kernels (the fused effective-weight build and the two operand-gradient
  kernels of the weight-sized contraction step);
- :mod:`.launch`: their launchers, used by the ``triton`` backend (``tenvoo_fast.ops`` with
  ``kernel="triton"``) and compiled ahead of time by ``tenvoo-fast check-kernels``.
"""
