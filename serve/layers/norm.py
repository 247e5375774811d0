"""RMSNorm, computed the way Hugging Face's Llama/Qwen checkpoints were trained with.

Normalise in float32, cast back to the activation dtype, then scale by the weight. In float32 that
is one fused `F.rms_norm` call; in bf16/fp16 the cast must come before the weight multiply, or
logits drift from the reference by a rounding step per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension."""

    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [..., D]; `weight` broadcasts against x (e.g. [D], or [heads, D] for per-head norms)."""
    if x.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, weight.shape, weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return normed * weight
