"""RMSNorm, computed the way Hugging Face's Llama/Qwen checkpoints were trained with.

Normalise in float32, cast back to the activation dtype, then scale by the weight. In float32 that
is one fused `F.rms_norm` call; in bf16/fp16 the cast must come before the weight multiply, or
logits drift from the reference by a rounding step per layer.

On CUDA the same PyTorch ops run compiled into one kernel (`compiled.py`). On CPU a small C kernel (`serve.kernels.cpu_build.build_cpu_kernels`) does the same arithmetic in one
call, optionally fused with the residual add before it (`add_rms_norm`): ~3 us a row instead of
~10-15 us for the chain of PyTorch ops at decode, 60 norms a token for SmolLM2. It rounds exactly
where the ops above round (bit-identical to HF in bf16 in our tests); in float32 its sum of squares
runs in another order (differences of an ulp).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled
from .compiled import compile_enabled, compiled


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
    if (kernel := _kernel_for(x, weight)) is not None:
        out = torch.empty_like(x)
        kernel(x.data_ptr(), None, None, weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
               x.shape[-1], eps, torch.get_num_threads())
        return out
    if compile_enabled(x):
        return compiled(reference_rms_norm)(x, weight, eps)
    return reference_rms_norm(x, weight, eps)


def reference_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`rms_norm` in PyTorch ops (what the kernel is tested against, and the path where it cannot run)."""
    if x.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, weight.shape, weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return normed * weight


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the norm after it: returns (x + delta, rms_norm(x + delta)), x and delta [N, D]."""
    if (kernel := _kernel_for(x, weight)) is not None and delta.dtype == x.dtype and delta.is_contiguous() \
            and delta.shape == x.shape:
        res, out = torch.empty_like(x), torch.empty_like(x)
        kernel(x.data_ptr(), delta.data_ptr(), res.data_ptr(), weight.data_ptr(), out.data_ptr(),
               x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads())
        return res, out
    if compile_enabled(x):
        return compiled(reference_add_rms_norm)(x, delta, weight, eps)
    return reference_add_rms_norm(x, delta, weight, eps)


def reference_add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`add_rms_norm` in PyTorch ops."""
    x = x + delta
    return x, reference_rms_norm(x, weight, eps)


def _kernel_for(x: Tensor, weight: Tensor):
    # The kernel: CPU, bf16/fp32, contiguous x, one weight [D] of x's dtype, D a multiple of 16.
    d = x.shape[-1]
    if not (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and weight.dtype == x.dtype
            and weight.shape == (d,) and d % 16 == 0 and x.is_contiguous() and weight.is_contiguous()
            and kernels_enabled()):
        return None
    lib = _library()
    if lib is None:
        return None
    return lib.slimlm_rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.slimlm_rms_norm_f32


@functools.cache
def _library():
    lib = build_cpu_kernels("norm")
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    for name in ("slimlm_rms_norm_bf16", "slimlm_rms_norm_f32"):
        getattr(lib, name).argtypes = [p, p, p, p, p, i, i, ctypes.c_float, i]
        getattr(lib, name).restype = None
    return lib


