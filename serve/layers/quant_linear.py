"""`QuantLinear`: a weight-only int4/int8 linear layer (W4A16, W8A16) for the CPU runtime.

It takes the format-independent pieces of a quantized weight (codes, per-group scales and integer
zero points; w = (code - zero) * scale), repacks them once into the layout of slimlm's C kernel
(`serve.kernels.quant_cpu`) and keeps nothing else: no dense copy, int4 g64 holds 0.55 bytes per
weight against bf16's 2.

Which path runs depends on the rows of the call. Measured on the 2-core AVX-512-BF16 CI machine,
SmolLM2-135M's shapes, int4/int8 g64, one thread, weights streamed from memory, against the bf16
`PackedLinear` (`scripts/time_quant_linear.py --threads 1 --clock cpu --paths --baselines`):
- fewer than `gemm_min_rows(bits)` rows (decode): the fused dequant-GEMV, exact: bf16 products of x
  and the codes summed in float32, scaled per group, rounded once. int4: 1.6x (576 x 576) to 2.9x
  (3072 x 576) at one row, 3.4x for the LM head, 2.5x over one decode step's projections; 1.6-1.9x
  at 16 rows, 1.1-1.2x at 64. int8: 1.3-1.8x up to 8 rows (it multiplies each code as two nibbles).
- from that many rows, bf16 activations (prefill, large batches): each 64-row block is
  dequantized once per call into a small per-thread buffer (bf16((c - z) * s), the weight a bf16
  checkpoint would hold) and multiplied like a bf16 weight: int4 1.00-1.02x of bf16 at 128-256 rows,
  int8 0.94-0.98x, where the exact kernel falls to 0.88x (int4) and 0.47x (int8).
  The alternatives measured worse: PyTorch's `_weight_int4pack_mm_for_cpu` is 1.4-1.7x bf16 at one
  row but 0.4-0.5x from 64 rows up (and PyTorch has no grouped int8: `_weight_int8pack_mm` is per
  channel, symmetric); F.linear on an unpacked bf16 weight, the GEMM of dequantize-then-oneDNN before
  the dequantization is paid, is 0.4x at one row and 0.87-0.97x at 64-256.
- float32 activations always take the exact kernel (x split exactly into three bf16 parts): 3.6-4.6x
  the float32 `PackedLinear` at 1-4 rows, 0.6-0.8x from 64 rows (exactness costs 3 products each).
- on AVX2 CPUs the kernels have a form of their own (cpu/qgemv_avx2.c) and other crossovers
  (`GEMM_MIN_ROWS`); docs/benchmarks.md, "Serving: speed on an AVX2 CPU", has that machine's figures.
- no C kernel (no compiler, neither AVX-512-BF16 nor AVX2, SLIMLM_CPU_KERNELS=0): plain PyTorch, dequantizing 1024
  output rows at a time (float32, exact, slow; nothing kept between calls).

Act-order checkpoints whose groups are scattered over the inputs (GPTQ `desc_act` without static
groups) are stored with their columns sorted by group, so the groups are consecutive again, plus `perm`
(the input each stored column multiplies): the layer gathers `x[:, perm]` (one copy of the
activations, in the C kernel) before the product.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from ..kernels.cpu_build import cpu_isa, kernels_enabled
from ..kernels.quant_cpu import PackedQuantWeight, QWeightArgs, dequantize_rows, qgemv_library, repack, unpack_codes

ACT_DTYPES = (torch.bfloat16, torch.float32)
# Rows from which bf16 activations take the dequantize-then-GEMM path, per instruction set of the kernels:
# the measured crossovers. AVX-512: int4 exact kernel 1.1-1.2x of bf16 at 64 rows, GEMM 1.0x, both ~1.0
# at 128; int8 exact wins at 16, GEMM at 32. AVX2 (Zen 3, `scripts/time_quant_linear.py --rows 16 24 32 48
# --threads 2 --paths --stat min`): int4 exact 1.07-1.15x of bf16 at 32 rows against the GEMM's 1.02-1.03x,
# the two tied at 48; int8 tied at 16, the GEMM ahead from 24 (0.85-0.94x against 0.74-0.82x).
GEMM_MIN_ROWS = {"avx512": {4: 96, 8: 24}, "avx2": {4: 48, 8: 24}}
FALLBACK_CHUNK = 1024  # output rows dequantized at a time by the PyTorch path


def gemm_min_rows(bits: int) -> int:
    """Rows from which bf16 activations of a `bits`-bit layer take the dequantize-then-GEMM kernel here."""
    return GEMM_MIN_ROWS[cpu_isa() or "avx512"][bits]


class QuantLinear(nn.Module):
    """y = x @ ((codes - zeros) * scales).T + bias, for x [..., in] -> [..., out]. CPU, inference only.

    Build it with `from_codes`. `act_dtype` (bfloat16 or float32) is the dtype it computes and
    returns in; inputs of another dtype are cast to it. `dequantize()` gives the dense weight.
    """

    def __init__(self, packed: PackedQuantWeight, bias: Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16, use_kernel: bool | None = None,
                 perm: Tensor | None = None):
        super().__init__()
        if act_dtype not in ACT_DTYPES:
            raise ValueError(f"act_dtype must be torch.bfloat16 or torch.float32, got {act_dtype}")
        if bias is not None and tuple(bias.shape) != (packed.out_features,):
            raise ValueError(f"bias must be [{packed.out_features}], got {tuple(bias.shape)}")
        self.perm = None if perm is None else check_perm(perm, packed.in_features)
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.group_size, self.act_dtype = packed.bits, packed.group_size, act_dtype
        # float32 whatever its dtype (exact for bf16/fp16): the kernel adds it in float32 before rounding.
        self.bias = None if bias is None else bias.detach().float().contiguous()
        use_kernel = kernels_enabled() if use_kernel is None else use_kernel
        self._lib = qgemv_library() if use_kernel else None
        if self._lib is not None:
            # Everything but x, y and the row count, fixed at load in one struct: a decode call costs
            # microseconds of Python, as much as the int4 kernel itself takes for a small layer.
            gemm_min = gemm_min_rows(self.bits) if act_dtype == torch.bfloat16 else 2 ** 31 - 1
            self._args = QWeightArgs.of(packed, self.bias, act_dtype == torch.bfloat16, gemm_min, self.perm)
            self._args_ptr = ctypes.addressof(self._args)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int,
                   bias: Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                   perm: Tensor | None = None) -> QuantLinear:
        """codes uint8 [out, in] in 0..2^bits-1; scales fp16/bf16/fp32 and zeros (integers) [out, in / group_size].

        group_size is 32, 64, 128 (or another multiple of 16) dividing `in`, or `in` itself (one group
        per row). Symmetric schemes pass zeros = 2^(bits-1). `perm` (a permutation of 0..in-1, or None):
        column j of `codes` multiplies input `perm[j]`. Raises ValueError naming the sizes.
        """
        return cls(repack(codes.cpu(), scales.cpu(), zeros.cpu(), group_size, bits),
                   None if bias is None else bias.cpu(), act_dtype, perm=None if perm is None else perm.cpu())

    @property
    def uses_kernel(self) -> bool:
        return self._lib is not None

    def dequantize(self) -> Tensor:
        """The dense weight [out, in], float32: (code - zero) * scale, exactly as the reference defines it
        (columns in input order)."""
        w = dequantize_rows(*unpack_codes(self.packed), self.group_size)
        return w if self.perm is None else w[:, torch.argsort(self.perm.long())]

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        if (self._lib is not None and x.dim() == 2 and x.dtype == self.act_dtype and x.device.type == "cpu"
                and x.is_contiguous()):
            return self._kernel(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()  # [M, in]
        y = self._kernel(x) if self._lib is not None and x.device.type == "cpu" else self._forward_torch(x)
        return y.reshape(*lead, self.out_features)

    def _kernel(self, x: Tensor) -> Tensor:
        # x: [M, in] contiguous, act_dtype -> [M, out]; the C side picks GEMV or GEMM by M
        y = x.new_empty(x.shape[0], self.out_features)
        self._lib.slimlm_qlinear(self._args_ptr, x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())
        return y

    def _forward_torch(self, x: Tensor) -> Tensor:
        # The reference arithmetic in float32, a slice of output rows at a time: no dense copy is kept.
        xf = x.float() if self.perm is None else x.float().index_select(1, self.perm.long())
        parts = []
        for start in range(0, self.out_features, FALLBACK_CHUNK):
            rows = slice(start, min(start + FALLBACK_CHUNK, self.out_features))
            parts.append(xf @ dequantize_rows(*unpack_codes(self.packed, rows), self.group_size).t())
        y = torch.cat(parts, dim=1) if parts else xf.new_zeros(x.shape[0], 0)
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.act_dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, act_dtype={self.act_dtype}, kernel={self.uses_kernel}"
                + (", act-order input order" if self.perm is not None else ""))


def check_perm(perm: Tensor, in_features: int) -> Tensor:
    """`perm` as a contiguous int32 CPU tensor, after checking that it orders all `in_features` inputs."""
    perm = torch.as_tensor(perm)
    if perm.dim() != 1 or perm.numel() != in_features or perm.is_floating_point():
        raise ValueError(f"perm must be integers [{in_features}] (a permutation of the inputs), got "
                         f"{tuple(perm.shape)} {perm.dtype}")
    if not torch.equal(torch.sort(perm.long()).values, torch.arange(in_features, device=perm.device)):
        raise ValueError(f"perm must hold each input index 0..{in_features - 1} exactly once")
    return perm.to(device="cpu", dtype=torch.int32).contiguous()
