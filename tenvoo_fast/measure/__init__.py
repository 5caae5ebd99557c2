"""Measuring what the adapters cost beyond their flops: what autograd keeps for backward
(:mod:`.saved_tensors`)."""
from .saved_tensors import SavedBytes, held_by, note_kept, owned_tensors, saved_bytes

__all__ = ["SavedBytes", "held_by", "note_kept", "owned_tensors", "saved_bytes"]
