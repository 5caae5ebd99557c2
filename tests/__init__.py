"""The test suite: one package per part of tenvoo_fast (contraction, methods, ops, kernels,
dispatch, nn, model, ddpm); the shared helpers (``tests.oracle``, ``tests.layer_checks``,
``tests.ddpm_shapes``) import as modules of this package."""
