"""The linear layer seam: every projection in `serve.models` is built by a `LinearFactory`.

The default, `make_linear`, holds a dense weight and calls `F.linear`. A quantized weight format
plugs in by passing its own factory to `CausalLM.from_hf(..., make_linear=...)`: it receives the
(already fused) weight and bias and returns any module mapping [N, in] -> [N, out].
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

LinearFactory = Callable[[Tensor, "Tensor | None"], nn.Module]


class Linear(nn.Module):
    """y = x @ weight.T + bias, for weight [out, in], bias [out] or None. Inference only (no grad)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in={in_f}, out={out_f}, bias={self.bias is not None}, dtype={self.weight.dtype}"


def make_linear(weight: Tensor, bias: Tensor | None = None) -> nn.Module:
    """The dense default `LinearFactory`."""
    return Linear(weight, bias)
