"""``--count-launches``: one training step counted by :class:`~tenvoo_fast.measure.launches.
LaunchCounter`, per step and per layer, for ``finetune``'s metrics and ``profile``'s table.

The counted layers are the adapted ones, or (full fine-tuning, no adapter) every Conv3d and
Linear: the layers an adapter would replace, so that the per-layer numbers of methods compare.
The optimizer's step is counted under its own scope.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..measure.launches import LaunchCounter
from ..model import adapter_layers


def counted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a count attributes: the adapted ones, else every Conv3d and Linear."""
    layers = adapter_layers(model)
    if layers:
        return dict(layers)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv3d, nn.Linear))}


@contextmanager
def counting(model: nn.Module, optimizer):
    """Count what runs inside (one training step); yields a dict that holds the report
    (:meth:`LaunchCounter.report`) once the block ends."""
    counter = LaunchCounter()
    layers = counted_layers(model)
    counter.attribute(layers)
    regions = []
    pre = optimizer.register_step_pre_hook(
        lambda *a: regions.append(_enter(counter.region("optimizer"))))
    post = optimizer.register_step_post_hook(lambda *a: regions.pop().__exit__(None, None, None))
    result: dict = {}
    try:
        with counter:
            yield result
    finally:
        pre.remove()
        post.remove()
        counter.detach()
    result.update(counter.report(layers))


def _enter(cm):
    cm.__enter__()
    return cm


def summary(report: dict) -> str:
    """One line for the run's log."""
    step, per = report["step"], report["per_layer"]
    line = (f"launches per step: {step['launches']:,} ({step['copies']:,} copies, "
            f"{step['views']:,} views, {step['syncs']} host syncs, {step['triton']} Triton)")
    if per:
        line += (f"; per counted layer ({report['layers']}): {per['launches']:.1f} launches, "
                 f"{per['copies']:.1f} copies")
    return line
