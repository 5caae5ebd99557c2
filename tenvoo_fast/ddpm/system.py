"""What a run's numbers depend on and how they are taken: versions, device synchronisation,
peak memory, seeds."""
from __future__ import annotations

import sys

import numpy as np
import torch

from .._version import __version__


def mix_seed(*values: int) -> int:
    """A well-mixed seed from several non-negative integers."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock step times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def versions() -> dict:
    """The versions of what a run's numbers depend on, for metrics and profiles."""
    import monai
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "monai": monai.__version__,
            "tenvoo_fast": __version__}
