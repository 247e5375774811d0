"""Fake quantization with a straight-through estimator, for quantization-aware training.

The forward pass sees the weight exactly as RTN would store it; the backward pass treats the rounding
as the identity, so gradients reach the full-precision weight unchanged (Bengio et al. 2013). Without
the straight-through trick the gradient of rounding is zero almost everywhere and nothing would learn.
"""
from __future__ import annotations

import torch

from .rtn import rtn_dequantize
from .scheme import QuantScheme


def fake_quant(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`w` [out, in] rounded to the scheme's grid in the forward pass; identity in the backward pass.

    The values equal `rtn_quantize(w, scheme).dequantize()` (cast back to `w.dtype`); scales and zero
    points are computed from `w` but carry no gradient.
    """
    return _StraightThrough.apply(w, scheme)


class _StraightThrough(torch.autograd.Function):
    # Not `w + (deq - w).detach()`: that sum is not always exactly `deq` in floating point, and the
    # forward values must equal the stored weights bit for bit.

    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return rtn_dequantize(w, scheme).to(w.dtype)  # [out, in]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None
