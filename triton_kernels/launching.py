"""How every launcher starts a kernel, and what it asks of the device."""
import contextlib

import torch

#: Context-manager factories entered around every launch, given the kernel (how a launch
#: counter sees Triton launches, and keeps the interpreter's own torch calls out of its counts).
OBSERVERS: list = []
_DRY_RUN = False


@contextlib.contextmanager
def dry_run():
    """Within: launches are observed but not run, and their floating-point tensor arguments
    (inputs too: the model's weights) are zeroed instead (the results are meaningless, but
    finite). For counting a whole model's
    launches without a GPU, where the interpreter would take hours; counts do not depend on
    values."""
    global _DRY_RUN
    before, _DRY_RUN = _DRY_RUN, True
    try:
        yield
    finally:
        _DRY_RUN = before


def launch(kernel, grid, *args, num_warps: int, **consts):
    """``kernel[grid](*args, **consts)`` with floating-point contraction (FMA fusion) off: every
    kernel subtracts θ0's term from θ's, which must be exactly 0 when θ = θ0, as in torch."""
    if not OBSERVERS and not _DRY_RUN:
        return kernel[grid](*args, **consts, num_warps=num_warps, enable_fp_fusion=False)
    with contextlib.ExitStack() as stack:
        for observe in list(OBSERVERS):
            stack.enter_context(observe(kernel))
        if _DRY_RUN:
            with torch.no_grad():
                for a in args:
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        a.data.zero_()      # .data: no version bump, caches stay valid
            return None
        return kernel[grid](*args, **consts, num_warps=num_warps, enable_fp_fusion=False)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device: how many programs fill it."""
    return torch.cuda.get_device_properties(device).multi_processor_count
