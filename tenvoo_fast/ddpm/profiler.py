"""``tenvoo-fast finetune --profile``: a torch profiler over a few optimizer steps, written as a
Chrome trace and a table of the top ops."""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import atomic_path
from .system import gib, peak_memory_bytes

#: ``--profile`` records this many optimizer steps, after one warm-up step.
PROFILE_STEPS = 3


TRACE, PROFILE = "trace.json", "profile.txt"


def step_profiler(out: Path, device: torch.device, steps: int, say):
    """A torch profiler over ``PROFILE_STEPS`` optimizer steps after one warm-up step, which
    writes ``trace.json`` (Chrome trace) and ``profile.txt`` (top 15 ops by self time, memory
    peak) and prints a summary; None when there is no step to profile."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if steps < 1:
        say("profile: no optimizer step to profile")
        return None
    warmup = 1 if steps > 1 else 0
    active = min(PROFILE_STEPS, steps - warmup)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def write(prof) -> None:
        events = prof.key_averages()
        peak = peak_memory_bytes(device)
        with atomic_path(out / TRACE) as tmp:
            prof.export_chrome_trace(tmp)
        with atomic_path(out / PROFILE) as tmp, open(tmp, "w") as f:
            f.write(f"tenvoo-fast finetune --profile: {active} optimizer step(s) after {warmup} "
                    f"warm-up, on {device}\npeak memory: {gib(peak)} "
                    f"({peak} bytes)\n\n{events.table(sort_by=sort_by, row_limit=15)}\n")
        top = sorted(events, key=lambda e: getattr(e, sort_by), reverse=True)[:5]
        say(f"profile ({active} steps): top ops by self time: " + ", ".join(
            f"{e.key} {getattr(e, sort_by) / 1000:.1f} ms" for e in top))
        say(f"wrote {out / TRACE} and {out / PROFILE}")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    return profile(activities=activities, profile_memory=True, on_trace_ready=write,
                   schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1))
