"""Triton kernels for tenvoo_fast, installed as ``tenvoo_fast.triton_kernels``; the ``triton``
backend's implementation of the ops' heavy steps (:mod:`tenvoo_fast.kernels` picks them).

One file per kernel family and one launcher file beside it:

- :mod:`.last_step` / :mod:`.launch_last_step`: the weight-sized contraction step (the fused
  effective-weight build and the two operand-gradient kernels; the merged strategy);
- :mod:`.implicit_conv` / :mod:`.launch_conv`: the conv with its weight tiles generated on chip
  (the implicit-gemm strategy);
- :mod:`.factorized_conv` / :mod:`.launch_factorized`: the factorized conv's activation-sized
  maps (the factorized strategy);
- :mod:`.voxels` (voxel indexing the conv kernels share) and :mod:`.launching` (how every
  launcher starts a kernel).

``tenvoo-fast check-kernels`` compiles every kernel ahead of time for sm_80 and sm_90.
"""
