"""Triton kernels for tenvoo_fast, installed as ``tenvoo_fast.triton_kernels``.

Empty until the fast-path issue lands: no kernel here pretends to work, and the ``triton``
backend is not registered (``tenvoo_fast.available_backends()`` does not list it).
"""
