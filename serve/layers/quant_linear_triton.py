"""`TritonQuantLinear`: the weight-only int4/int8 linear layer (W4A16, W8A16) on a GPU.

The GPU counterpart of `QuantLinear` (CPU): same inputs (codes, per-group scales and integer zero
points, w = (code - zero) * scale), packed once into the Triton kernels' layout
(`serve.kernels.quant_triton`), nothing dense kept. Decode-sized calls take a fused
dequantize-matmul kernel (split-K), prefill and large batches dequantize once per call and run
cuBLAS; which one at each row count comes from the GPU's tuned table (`quant_triton.tuned_configs`). Act-order checkpoints with scattered groups
pass `perm` as `QuantLinear` does: the layer gathers `x[:, perm]` before the kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.quant_triton import ACT_DTYPES, TritonQuantWeight, dequantize, pack_for_triton, quant_matmul
from .quant_linear import check_perm


class TritonQuantLinear(nn.Module):
    """y = x @ ((codes - zeros) * scales).T + bias, for x [..., in] -> [..., out], on CUDA. Inference only.

    Build it with `from_codes`. `act_dtype` (bfloat16, float16 or float32) is the dtype it computes
    and returns in; inputs of another dtype are cast to it.
    """

    def __init__(self, weight: TritonQuantWeight, bias: Tensor | None = None, perm: Tensor | None = None):
        super().__init__()
        if bias is not None and tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"bias must be [{weight.out_features}], got {tuple(bias.shape)}")
        self.perm = None if perm is None else check_perm(perm, weight.in_features).long().to(weight.qweight.device)
        self.weight_q = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bits, self.group_size, self.act_dtype = weight.bits, weight.group_size, weight.act_dtype
        self.bias = None if bias is None else bias.detach().to(weight.act_dtype).to(weight.qweight.device)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int,
                   bias: Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str = "cuda", perm: Tensor | None = None) -> TritonQuantLinear:
        """codes uint8 [out, in] in 0..2^bits-1; scales and zeros (integers) [out, in / group_size].

        The checks, the group sizes accepted and `perm` are `QuantLinear.from_codes`'s; raises ValueError
        naming the sizes.
        """
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be one of {ACT_DTYPES}, got {act_dtype}")
        return cls(pack_for_triton(codes.cpu(), scales.cpu(), zeros.cpu(), group_size, bits, act_dtype, device), bias,
                   perm)

    def dequantize(self) -> Tensor:
        """The dense weight [out, in] in act_dtype (bf16((code - zero) * scale) for bf16)."""
        w = dequantize(self.weight_q)
        return w if self.perm is None else w[:, torch.argsort(self.perm)]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.act_dtype)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        y = quant_matmul(x, self.weight_q, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, act_dtype={self.act_dtype}, device={self.weight_q.qweight.device}")
