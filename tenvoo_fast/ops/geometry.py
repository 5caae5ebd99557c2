"""One Conv3d geometry for every op: stride, padding and dilation, passed to the ops as 9 ints
(``conv``; empty for a Linear), and the output shape and layout the ops give."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]

    @classmethod
    def unpack(cls, conv: Sequence[int]) -> "ConvGeometry":
        """From the ops' 9-int ``conv`` argument (stride + padding + dilation)."""
        return cls(tuple(conv[0:3]), tuple(conv[3:6]), tuple(conv[6:9]))

    def pack(self) -> list[int]:
        return [*self.stride, *self.padding, *self.dilation]

    def output_spatial(self, spatial: Sequence[int], taps: Sequence[int]) -> list[int]:
        """The output voxel counts for input voxels ``spatial`` and kernel ``taps``."""
        return conv_output_spatial(spatial, taps, self.stride, self.padding, self.dilation)


def conv_output_spatial(spatial, taps, stride, padding, dilation) -> list[int]:
    """A Conv3d's output voxel counts (PyTorch's formula), for fake kernels and cost models."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
            zip(spatial, taps, stride, padding, dilation)]


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout the ops give their outputs and input gradients: channels-last for a
    channels-last input (and not also contiguous), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def conv_output_like(x: Tensor, base: Tensor, conv: Sequence[int]) -> Tensor:
    """An empty Conv3d output for input ``x`` and weight ``base``, in x's dtype and
    :func:`memory_format`: the conv ops' fake kernels."""
    spatial = ConvGeometry.unpack(conv).output_spatial(x.shape[2:], base.shape[2:])
    return torch.empty((x.shape[0], base.shape[0], *spatial), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


def check_conv_args(x: Tensor, base: Tensor, cores, frozen, bias, conv, frozen_counts) -> None:
    """What every conv op's fake kernel checks (``torch._check``): a 5-D input whose channels
    match a 5-D weight, a 9-int geometry, a bias of Cout, and as many frozen tensors as
    ``frozen_counts`` allows."""
    torch._check(x.dim() == 5, lambda: f"input must be 5-D (N, C, D, H, W), got {x.dim()}-D")
    torch._check(base.dim() == 5, lambda: f"weight must be 5-D, got {base.dim()}-D")
    torch._check(x.shape[1] == base.shape[1],
                 lambda: f"input has {x.shape[1]} channels, the weight {base.shape[1]}")
    torch._check(len(conv) == 9, lambda: f"conv must be stride + padding + dilation (9 ints), "
                                         f"got {len(conv)}")
    check_common(x, base, cores, frozen, bias, frozen_counts)


def register_cores_conv_fake(op) -> None:
    """The fake kernel of a conv op that takes the cores themselves (factorized, implicit-gemm:
    ``op(x, base, cores, frozen, bias, equation, letters, scale, conv, impl)``): validates the
    arguments, then gives :func:`conv_output_like`."""
    @op.register_fake
    def _(x, base, cores, frozen, bias, equation, letters, scale, conv, impl):
        check_conv_args(x, base, cores, frozen, bias, conv, (0, len(cores)))
        torch._check(letters.count(",") == 2, lambda: f"letters {letters!r}: give 'out,in,tap'")
        return conv_output_like(x, base, conv)


def check_linear_args(x: Tensor, base: Tensor, cores, frozen, bias, frozen_counts) -> None:
    """What every linear op's fake kernel checks: features that match a 2-D weight."""
    torch._check(base.dim() == 2, lambda: f"weight must be 2-D, got {base.dim()}-D")
    torch._check(x.shape[-1] == base.shape[1],
                 lambda: f"input has {x.shape[-1]} features, the weight {base.shape[1]}")
    check_common(x, base, cores, frozen, bias, frozen_counts)


def check_common(x, base, cores, frozen, bias, frozen_counts) -> None:
    torch._check(len(cores) > 0, lambda: "an adapter needs at least one core")
    torch._check(len(frozen) in frozen_counts,
                 lambda: f"{len(frozen)} frozen tensors; expected one of {sorted(frozen_counts)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == base.shape[0],
                     lambda: f"bias must be ({base.shape[0]},), got {tuple(bias.shape)}")


def input_grad_like(x: Tensor) -> Tensor:
    """An empty input gradient in x's :func:`memory_format` (the conv ops' backward fakes)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
