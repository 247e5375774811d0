"""Weight-only int4/int8 CPU matmul: the repacked layout, its C kernel (`cpu/qgemv.c`) and a reference.

A quantized weight is codes c [out, in] in 0..2^bits-1, scales s and integer zero points z per
(output row, group of `group_size` consecutive inputs); it stands for w = (c - z) * s.

Why a layout of its own: decode multiplies each weight by one or a few rows, so its time is the time
to stream the weight from memory; int4 is a quarter of bf16's bytes, and the kernel must turn those
bytes into products faster than they arrive. `repack` therefore arranges, once at load, each block of
64 output rows as a run of 64-byte chunks that one aligned load brings in and seven integer ops turn
into four bf16 operands of `vdpbf16ps` (16 rows x 2 inputs each): lane j (16 bits) of a chunk holds
four nibbles, nibble q for row 16q + j/2 and input slot j%2 of the chunk's input pair. int4 fills a
chunk with 2 inputs x 64 rows; int8 with 1 input x 64 rows, its low and high nibbles in the two slots
(the kernel pairs them with x and 16 x). Scales (kept in their 16-bit dtype where that is exact) and
zeros (uint8) follow per block, [blocks][groups][64]. Bytes per weight: int4 g64 0.547 (codes 0.5,
fp16 scale and u8 zero 0.047), int8 g64 1.047, against 2 for bf16.

Two entry points read the layout (serve/layers/quant_linear.py picks one by the number of rows):
- `qgemv` (`slimlm_qgemv`): few rows, exact. Products of bf16 x (float32 x split exactly into three
  bf16 parts) and exact bf16 codes, summed in float32, scaled per group; bias added, rounded once.
- `qgemm_bf16` (`slimlm_qgemm_bf16`): many rows, bf16 only. Each 64-row block is dequantized to
  bf16((c - z) * s) once per call into a per-thread buffer and multiplied like a bf16 weight.
`reference_qmatmul` is the plain-PyTorch definition both are tested against.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .cpu_build import build_cpu_kernels

BLOCK = 64  # output rows per block (QB in qgemv.c)
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # sdt in qgemv.c


@dataclass
class PackedQuantWeight:
    """A quantized weight in the kernel's layout (see the module doc); build it with `repack`.

    codes: uint8 [blocks * steps * 64]; scales: [blocks, G, 64] fp32/fp16/bf16; zeros: uint8 [blocks, G, 64].
    Rows past `out_features` (the last block's padding) have code, scale and zero 0.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    out_features: int
    in_features: int
    group_size: int
    bits: int

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def steps(self) -> int:
        """64-byte chunks per block: inputs / 2 for int4 (pairs; an odd group gets a pad input), inputs for int8."""
        return self.groups * (((self.group_size + 1) // 2) if self.bits == 4 else self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def check_quant_args(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int) -> None:
    """Raise ValueError naming the sizes unless codes [out, in], scales/zeros [out, in / group_size] fit."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if out_f == 0 or in_f == 0:
        raise ValueError(f"codes must have at least one row and one column, got shape {tuple(codes.shape)}")
    if not isinstance(group_size, int) or group_size <= 0 or in_f % group_size:
        raise ValueError(f"group_size {group_size!r} does not divide in_features {in_f} (codes {out_f}x{in_f}); "
                         f"use a group size that divides it (32, 64, 128) or {in_f} for one group per row")
    if group_size != in_f and group_size % 16:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 (32, 64, 128) or in_features ({in_f})")
    g = in_f // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (out_f, g):
            raise ValueError(f"{name} must be [out, in / group_size] = [{out_f}, {g}] for codes {out_f}x{in_f} "
                             f"and group_size {group_size}; got {tuple(t.shape)}")
    if scales.dtype not in SCALE_KINDS:
        raise ValueError(f"scales must be float32, float16 or bfloat16, got {scales.dtype}")
    maxq = (1 << bits) - 1
    for name, t in (("codes", codes), ("zeros", zeros)):
        if t.dtype.is_floating_point and not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integers")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > maxq):
            raise ValueError(f"{name} must lie in 0..{maxq} for {bits}-bit codes; got {int(t.min())}..{int(t.max())}")


def _compact_scales(scales: Tensor) -> Tensor:
    # float32 scales that are exactly fp16 or bf16 values (toolkit.quant rounds them so) take half the bytes.
    if scales.dtype == torch.float32:
        for dt in (torch.float16, torch.bfloat16):
            if torch.equal(scales.to(dt).float(), scales):
                return scales.to(dt)
    return scales


def _blocked(t: Tensor, blocks: int) -> Tensor:
    # [out, G] -> [blocks, G, 64], zero rows appended to fill the last block
    out_f, g = t.shape
    padded = t.new_zeros(blocks * BLOCK, g)
    padded[:out_f] = t
    return padded.view(blocks, BLOCK, g).transpose(1, 2).contiguous()


def repack(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int) -> PackedQuantWeight:
    """codes [out, in] (0..2^bits-1), scales and zeros [out, in / group_size] -> the kernel's layout."""
    check_quant_args(codes, scales, zeros, group_size, bits)
    out_f, in_f = codes.shape
    blocks = -(-out_f // BLOCK)
    c = torch.zeros(blocks * BLOCK, in_f, dtype=torch.uint8)
    c[:out_f] = codes.to(torch.uint8)
    if bits == 4:
        if in_f % 2:  # only one group per row can be odd-sized: one zero input at its end
            c = torch.cat([c, c.new_zeros(c.shape[0], 1)], dim=1)
        nib = c.view(blocks, 4, 16, -1, 2)                                # [b, q, p, step, slot]
    else:
        nib = torch.stack([c & 15, c >> 4], dim=-1).view(blocks, 4, 16, in_f, 2)  # slot 0 low, 1 high nibble
    nib = nib.permute(0, 3, 2, 4, 1)                                      # [b, step, p, slot, q]
    lanes = torch.stack([nib[..., 0] | (nib[..., 1] << 4), nib[..., 2] | (nib[..., 3] << 4)], dim=-1)
    return PackedQuantWeight(lanes.contiguous().view(-1), _blocked(_compact_scales(scales.detach()), blocks),
                             _blocked(zeros.detach().to(torch.uint8), blocks), out_f, in_f, group_size, bits)


def unpack_codes(p: PackedQuantWeight, rows: slice = slice(None)) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `repack` for output rows `rows` (whole blocks are unpacked; default all):
    codes uint8 [rows, in], scales [rows, G] (as stored), zeros uint8 [rows, G]."""
    start, stop, _ = rows.indices(p.out_features)
    b0, b1 = start // BLOCK, -(-stop // BLOCK)
    lanes = p.codes.view(p.scales.shape[0], -1, 16, 2, 2)[b0:b1]         # [b, step, p, slot, byte]
    nib = torch.stack([lanes[..., 0] & 15, lanes[..., 0] >> 4, lanes[..., 1] & 15, lanes[..., 1] >> 4], dim=-1)
    nib = nib.permute(0, 4, 2, 1, 3)                                      # [b, q, p, step, slot]
    n = (b1 - b0) * BLOCK
    if p.bits == 4:
        codes = nib.reshape(n, p.steps * 2)[:, :p.in_features]
    else:
        codes = (nib[..., 0] | (nib[..., 1] << 4)).reshape(n, p.in_features)
    keep = slice(start - b0 * BLOCK, stop - b0 * BLOCK)
    meta = lambda t: t[b0:b1].transpose(1, 2).reshape(n, p.groups)[keep].contiguous()  # noqa: E731
    return codes[keep].contiguous(), meta(p.scales), meta(p.zeros)


def dequantize_rows(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """w = (c - z) * s, float32 [out, in], one rounding per element (c - z is an exact integer)."""
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (codes.float() - z) * s


def reference_qmatmul(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      bias: Tensor | None = None) -> Tensor:
    """The definition: x [M, in] @ dequantized w.T (+ bias), in float64, as float64 [M, out]."""
    y = x.double() @ dequantize_rows(codes, scales, zeros, group_size).double().t()
    return y if bias is None else y + bias.double()


class QWeightArgs(ctypes.Structure):
    """`slimlm_qweight` of qgemv.c: a packed weight's fixed arguments, for `slimlm_qlinear`."""

    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out", ctypes.c_int), ("in_", ctypes.c_int), ("gs", ctypes.c_int),
                ("bits", ctypes.c_int), ("sdt", ctypes.c_int), ("x_bf16", ctypes.c_int),
                ("gemm_min_rows", ctypes.c_int), ("perm", ctypes.c_void_p)]

    @classmethod
    def of(cls, p: PackedQuantWeight, bias: Tensor | None, x_bf16: bool, gemm_min_rows: int,
           perm: Tensor | None = None) -> "QWeightArgs":
        """Points into p's, bias's and perm's (int32 [in]) storage: keep them alive as long as this."""
        return cls(p.codes.data_ptr(), p.scales.data_ptr(), p.zeros.data_ptr(),
                   None if bias is None else bias.data_ptr(), p.out_features, p.in_features, p.group_size, p.bits,
                   SCALE_KINDS[p.scales.dtype], int(x_bf16), gemm_min_rows, None if perm is None else perm.data_ptr())


@functools.cache
def qgemv_library() -> ctypes.CDLL | None:
    """`serve/kernels/cpu/qgemv.c`, built by `build_cpu_kernels`; None where it cannot run."""
    lib = build_cpu_kernels("qgemv")
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.slimlm_qgemv.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i, i]
    lib.slimlm_qgemv.restype = None
    lib.slimlm_qgemm_bf16.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, i]
    lib.slimlm_qgemm_bf16.restype = None
    lib.slimlm_qlinear.argtypes = [p, p, p, i, i]
    lib.slimlm_qlinear.restype = None
    return lib


def qgemv(lib: ctypes.CDLL, p: PackedQuantWeight, x: Tensor, bias: Tensor | None, threads: int) -> Tensor:
    """x [M, in] contiguous bf16 or fp32 -> [M, out] in x's dtype; bias float32 [out] or None."""
    m = x.shape[0]
    y = x.new_empty(m, p.out_features)
    lib.slimlm_qgemv(p.codes.data_ptr(), p.scales.data_ptr(), p.zeros.data_ptr(),
                     None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), m, p.out_features,
                     p.in_features, p.group_size, p.bits, SCALE_KINDS[p.scales.dtype],
                     int(x.dtype == torch.bfloat16), threads)
    return y


def qgemm_bf16(lib: ctypes.CDLL, p: PackedQuantWeight, x: Tensor, bias: Tensor | None, threads: int) -> Tensor:
    """Many rows: x [M, in] contiguous bf16 -> [M, out] bf16, through each block dequantized to bf16 once."""
    m = x.shape[0]
    y = x.new_empty(m, p.out_features)
    lib.slimlm_qgemm_bf16(p.codes.data_ptr(), p.scales.data_ptr(), p.zeros.data_ptr(),
                          None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), m, p.out_features,
                          p.in_features, p.group_size, p.bits, SCALE_KINDS[p.scales.dtype], threads)
    return y
