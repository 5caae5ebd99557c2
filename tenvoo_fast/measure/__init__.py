"""Measuring what the adapters cost beyond their flops: what autograd keeps for backward
(:mod:`.saved_tensors`)."""
from .saved_tensors import owned_tensors, saved_bytes

__all__ = ["owned_tensors", "saved_bytes"]
