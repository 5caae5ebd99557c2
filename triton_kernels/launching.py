"""How every launcher starts a kernel, and what it asks of the device."""
import contextlib

import torch

#: Context-manager factories entered around every launch, given the kernel (how a launch
#: counter sees Triton launches, and keeps the interpreter's own torch calls out of its counts).
OBSERVERS: list = []


def launch(kernel, grid, *args, num_warps: int, **consts):
    """``kernel[grid](*args, **consts)`` with floating-point contraction (FMA fusion) off: every
    kernel subtracts θ0's term from θ's, which must be exactly 0 when θ = θ0, as in torch."""
    if not OBSERVERS:
        return kernel[grid](*args, **consts, num_warps=num_warps, enable_fp_fusion=False)
    with contextlib.ExitStack() as stack:
        for observe in list(OBSERVERS):
            stack.enter_context(observe(kernel))
        return kernel[grid](*args, **consts, num_warps=num_warps, enable_fp_fusion=False)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: how many programs fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count
