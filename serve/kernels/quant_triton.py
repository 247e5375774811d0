"""Weight-only int4/int8 matmul in Triton (W4A16, W8A16): the GPU path of the quantized linear layer.

A quantized weight is codes c [out, in] in 0..2^bits-1, scales s and integer zero points z per
(output row, group of `group_size` consecutive inputs); it stands for w = (c - z) * s, as on CPU
(`serve.kernels.quant_cpu`, whose `reference_qmatmul` both are tested against).

Layout (`TritonQuantWeight`, built once at load by `pack_for_triton`): the codes packed along the
input dim into int32 words, [ceil(in / P), out] with P = 32 / bits codes per word (the GPTQ
`qweight` layout: code of input k sits in word k // P at bit (k % P) * bits), so a tile's loads are
contiguous along the output dim; scales [G, out] in the activation dtype (float32 where that is not
exact) and zeros uint8 [G, out]. int4 g128 moves 0.52 bytes per weight against bf16's 2.

Three ways to multiply, picked by the number of rows M of the call (`choose_config`, `quant_matmul`):
- one row (decode at batch 1): `_qgemv_kernel`, on the CUDA cores. Each program loads a
  [BLOCK_K / P, BLOCK_N] tile of words once, and for each of the P code positions multiplies the
  codes by the matching strided entries of x; a code becomes a float by OR-ing it into the mantissa
  of 2^23 (no int-to-float conversion, which runs at a quarter of the FMA rate), and since a word's
  codes share one group the scale is applied once per word. Split-K fills the SMs.
- a few to a few dozen rows: `_qmm_kernel` with `tl.dot`, in one of three forms: PER_CODE (a
  tl.dot per code position of a [BLOCK_K / P, BLOCK_N] tile of words, with the matching strided
  columns of x), or one [BLOCK_K, BLOCK_N] tile of codes per tl.dot, unpacked by a reshape of the
  words or, with GATHER, by loading each word once per code it holds (cache hits) and shifting in
  place. With LATE_SCALE (one group per K tile) the integers c - z, exact in the activation dtype,
  go into tl.dot and each column's scale multiplies the tile's sum; otherwise the weight is
  bf16((c - z) * s), what a bf16 checkpoint would hold.
- large batches and prefill ("dense"): `_dequant_kernel` writes the weight once per call into a
  scratch buffer (transposed, so that its stores are coalesced) and cuBLAS multiplies it.
Which form and tiles run at each M comes from a table measured on the GPU itself
(`scripts/time_triton_quant.py --sweep --write-configs`, kept in `tuned/` per GPU name, see
`tuned_configs`); GPUs without a table take `choose_config`'s built-in defaults and go dense from
DENSE_MIN_ROWS rows. Split-K partial sums are reduced by `_reduce_kernel` in split order, so results
do not depend on scheduling. Measured on an H200 (kernel time replayed from a CUDA graph, Llama-3-8B
shapes, int4 g128, over the four shapes): 1.53x bf16 cuBLAS at one row (1.2-1.7 TB/s of packed
weight), 0.85x at 2-4 rows, 0.73x at 8, 0.86x at 16, 0.49x at 32, 0.46x at 64, 0.42-0.59x at
128-256, 0.87x at 1024, 0.96x at 4096: below bf16 from 2 rows on, where a Marlin-style kernel (weights
pre-shuffled for the tensor cores' operand layout) is the known answer. docs/benchmarks.md has the
tables.

Under TRITON_INTERPRET=1 both kernels run on CPU tensors (slowly: for tests); the interpreter cannot
`tl.dot` bf16, so there the operands are upcast to float32 first (UPCAST).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting
from .quant_cpu import check_quant_args

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DENSE_MIN_ROWS = 32  # rows from which dequantize-then-GEMM runs (see the module doc)
GEMV_MAX_ROWS = 1  # up to this many rows, the CUDA-core kernel (one program per row)
KERNELS = ("gemv", "dot")
TUNED_DIR = Path(__file__).resolve().parent / "tuned"  # per-GPU tables written by the sweep (`tuned_configs`)
TUNED_ENV = "SLIMLM_TRITON_QUANT_CONFIGS"  # a table to use instead of the one for this GPU


@triton.jit
def _split_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # the BLOCK_K tiles [t0, t1) of the input dim that split pid_k covers
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLIT_K)
    t0 = pid_k * per_split
    return t0, tl.minimum(t0 + per_split, tiles)


@triton.jit
def _qmm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, NUM_WORDS, stride_xm, stride_om, stride_qk, stride_sg,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PER_CODE: tl.constexpr, LATE_SCALE: tl.constexpr, GATHER: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # [BLOCK_M, BLOCK_N] of y per program, over its split of K. PER_CODE: the tile's words are unpacked
    # one code position j at a time (rows PER*w + j of the tile), each multiplied by the matching
    # strided columns of x: no register reshuffle. Otherwise (a group size that is not a multiple of
    # the codes per word) the codes are reshaped into [BLOCK_K, BLOCK_N] first.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    t0, t1 = _split_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    for t in range(t0, t1):
        offs_w = t * BKW + tl.arange(0, BKW)
        w_ok = offs_w < NUM_WORDS
        if PER_CODE or not GATHER:
            words = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                            mask=w_ok[:, None] & n_ok[None, :], other=0)                 # [BKW, BN] int32
        if PER_CODE:
            if GROUP_SIZE % BLOCK_K == 0:  # one group for the whole tile
                g = (t * BLOCK_K) // GROUP_SIZE
                s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
                z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_ok, other=0)[None, :].to(tl.int32)
            else:  # a group per run of words (GROUP_SIZE is a multiple of PER)
                gw = ((offs_w * PER) // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
                ok = w_ok[:, None] & n_ok[None, :]
                s = tl.load(s_ptr + gw, mask=ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + gw, mask=ok, other=0).to(tl.int32)
            zm = z.to(tl.float32) + 8388608.0  # codes to floats as in _qgemv_kernel: OR-ed into 2^23
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PER):
                offs_k = offs_w * PER + j
                x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
                c = (((words >> (j * BITS)) & MASK) | 0x4B000000).to(tl.float32, bitcast=True)
                if LATE_SCALE:  # one group per tile: c - z is exact in x's dtype, the scale comes after the dot
                    w = (c - zm).to(x_ptr.dtype.element_ty)
                else:
                    w = ((c - zm) * s).to(x_ptr.dtype.element_ty)                        # one rounding
                if UPCAST:
                    part += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    part += tl.dot(x, w, input_precision=DOT_PRECISION)
            if LATE_SCALE:
                acc += part * s
            else:
                acc += part
        else:
            offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            if GATHER:  # each word loaded once per code it holds (cache hits), its code shifted out in place
                wk = tl.load(qw_ptr + (offs_k // PER)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                             mask=k_ok[:, None] & n_ok[None, :], other=0)
                codes = (wk >> ((offs_k % PER) * BITS)[:, None]) & MASK
            else:
                shifts = tl.arange(0, PER) * BITS
                codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
            cf = (codes | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + c, as in _qgemv_kernel
            if LATE_SCALE:  # one group for the tile: c - z is exact in x's dtype, the scale comes after the dot
                g = (t * BLOCK_K) // GROUP_SIZE
                s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
                z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_ok, other=0)[None, :].to(tl.float32)
                w = (cf - (z + 8388608.0)).to(x_ptr.dtype.element_ty)
            else:
                gk = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
                ok = k_ok[:, None] & n_ok[None, :]
                s = tl.load(s_ptr + gk, mask=ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + gk, mask=ok, other=0).to(tl.float32)
                w = ((cf - (z + 8388608.0)) * s).to(x_ptr.dtype.element_ty)
            if UPCAST:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, w, input_precision=DOT_PRECISION)
            if LATE_SCALE:
                acc += part * s
            else:
                acc += part
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:  # partial sums [SPLIT_K, M, N], summed by _reduce_kernel
        base = part_ptr + pid_k.to(tl.int64) * M * N
        tl.store(base + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc, mask=out_ok)


@triton.jit
def _qgemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, NUM_WORDS, stride_xm, stride_om, stride_qk, stride_sg,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # One row of x per program (decode): products on the CUDA cores, no tl.dot and its 16-row
    # padding; float32 throughout, [BKW, BLOCK_N] partial sums reduced once at the end.
    # GROUP_SIZE is a multiple of the codes per word.
    MAGIC_I: tl.constexpr = 0x4B000000  # the bits of 2^23 as a float32
    MAGIC_F: tl.constexpr = 8388608.0
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKW: tl.constexpr = BLOCK_K // PER
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    t0, t1 = _split_range(pid_k, K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    for t in range(t0, t1):
        offs_w = t * BKW + tl.arange(0, BKW)
        w_ok = offs_w < NUM_WORDS
        words = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                        mask=w_ok[:, None] & n_ok[None, :], other=0)                     # [BKW, BN] int32
        if GROUP_SIZE % BLOCK_K == 0:
            g = (t * BLOCK_K) // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_ok, other=0.0)[None, :].to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_ok, other=0)[None, :].to(tl.float32)
        else:
            gw = ((offs_w * PER) // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
            ok = w_ok[:, None] & n_ok[None, :]
            s = tl.load(s_ptr + gw, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gw, mask=ok, other=0).to(tl.float32)
        # A word's codes share a group, so sum (c - z) * x over its PER codes and scale once. The code
        # becomes a float without a conversion instruction (quarter rate on the GPU): OR-ed into the
        # mantissa of 2^23 it reads as 2^23 + c, exactly, and 2^23 + z is subtracted.
        zm = z + MAGIC_F
        tile = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER):
            offs_k = offs_w * PER + j
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)     # [BKW]
            c = (((words >> (j * BITS)) & MASK) | MAGIC_I).to(tl.float32, bitcast=True)
            tile += (c - zm) * x[:, None]
        acc += tile * s
    y = tl.sum(acc, axis=0)                                                              # [BN]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + m.to(tl.int64) * N + offs_n, y, mask=n_ok)


@triton.jit
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om,
                   SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # out[m, n] = sum over splits of part[:, m, n] (+ bias[n]), in split order: deterministic
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs_n < N
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(SPLIT_K):
        y += tl.load(part_ptr + k * M * N + m.to(tl.int64) * N + offs_n, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, wt_ptr, N, K, NUM_WORDS, stride_qk, stride_sg, stride_wk,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # wT [K, N] (the dense weight, transposed, in the activation dtype) = (c - z) * s: each program
    # unpacks a [BLOCK_W, BLOCK_N] tile of words and writes each code position as rows of wT, whose
    # stores run along N like the loads (coalesced both ways).
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    words = tl.load(qw_ptr + offs_w[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                    mask=(offs_w < NUM_WORDS)[:, None] & n_ok[None, :], other=0)
    for j in tl.static_range(PER):
        offs_k = offs_w * PER + j
        ok = (offs_k < K)[:, None] & n_ok[None, :]
        gk = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
        s = tl.load(s_ptr + gk, mask=ok, other=0.0)
        z = tl.load(z_ptr + gk, mask=ok, other=0)
        w = (((words >> (j * BITS)) & MASK) - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)
        tl.store(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
                 mask=ok)


@dataclass
class TritonQuantWeight:
    """A quantized weight in the Triton kernels' layout (module doc); build it with `pack_for_triton`.

    qweight: int32 [ceil(in / P), out]; scales: [G, out] in `act_dtype` (or float32 where that is not exact);
    zeros: uint8 [G, out].
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    out_features: int
    in_features: int
    group_size: int
    bits: int
    act_dtype: torch.dtype
    plans: dict = field(default_factory=dict, repr=False, compare=False)  # rows -> launch plan, see quant_matmul

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def pack_for_triton(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int,
                    act_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
                    ) -> TritonQuantWeight:
    """codes [out, in] (0..2^bits-1), scales and zeros [out, in / group_size] -> the kernels' layout on `device`.

    Scales are kept in `act_dtype` where that is exact, else in float32 (fp16 GPTQ scales served in
    bf16): the weight is never changed by the packing.
    """
    check_quant_args(codes, scales, zeros, group_size, bits)
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"the Triton kernels compute in {ACT_DTYPES}, not {act_dtype}")
    s = scales.detach().to(act_dtype)
    if not torch.equal(s.float(), scales.detach().float()):
        s = scales.detach().float()
    out_f, in_f = codes.shape
    per = 32 // bits
    words = -(-in_f // per)
    c = torch.zeros(out_f, words * per, dtype=torch.int64)
    c[:, :in_f] = codes.to(torch.int64)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (c.view(out_f, words, per) << shifts).sum(-1)                 # [out, words] in 0..2^32-1
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return TritonQuantWeight(packed.t().contiguous().to(device), s.t().contiguous().to(device),
                             zeros.detach().to(torch.uint8).t().contiguous().to(device), out_f, in_f, group_size,
                             bits, act_dtype)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, so that tests still run several splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def tuned_file(device_name: str) -> Path:
    """Where the table for a GPU of this name lives (`scripts/time_triton_quant.py --sweep --write-configs`)."""
    return TUNED_DIR / f"quant_triton_{re.sub(r'[^a-z0-9]+', '_', device_name.lower()).strip('_')}.json"


@functools.lru_cache(maxsize=None)
def tuned_configs(device_name: str) -> dict[int, dict]:
    """Row count -> the launch config the sweep measured fastest on this GPU from that many rows on.

    Read from $SLIMLM_TRITON_QUANT_CONFIGS when set, else from `tuned_file(device_name)`; {} when no
    table exists for this GPU (the built-in defaults of `choose_config` then apply). A config's
    "kernel" is "gemv", "dot" or "dense" (dequantize, then cuBLAS).
    """
    path = Path(os.environ.get(TUNED_ENV) or tuned_file(device_name))
    if not path.exists():
        if os.environ.get(TUNED_ENV):
            raise FileNotFoundError(f"{TUNED_ENV}={path}: no such file")
        return {}
    data = json.loads(path.read_text())
    table = {}
    for rows, cfg in data.get("configs", {}).items():
        if not str(rows).isdigit() or not isinstance(cfg, dict) or cfg.get("kernel") not in (*KERNELS, "dense"):
            raise ValueError(f"{path}: configs must map row counts to configs whose kernel is one of "
                             f"{(*KERNELS, 'dense')}, got {rows!r}: {cfg!r}")
        table[int(rows)] = cfg
    return table


def _tuned(m: int, device: torch.device) -> dict | None:
    # the tuned config for m rows on this GPU: the entry of the largest row count <= m, or None
    if device.type != "cuda" or interpreting():
        return None
    table = tuned_configs(torch.cuda.get_device_name(device))
    below = [rows for rows in table if rows <= m]
    return dict(table[max(below)]) if below else None


def choose_config(m: int, w: TritonQuantWeight, device: torch.device, kernel: str | None = None) -> dict:
    """The kernel ("gemv" or "dot", or the one given) and its tile sizes for an [m, in] x weight call.

    The defaults are the fastest of `scripts/time_triton_quant.py --sweep` on an H200 (docs/benchmarks.md).
    """
    per = 32 // w.bits
    per_code = w.group_size % per == 0  # each word's codes share a group: the per-code kernels apply
    tuned = _tuned(m, device) if kernel is None and per_code else None
    if tuned is not None and tuned["kernel"] != "dense":
        cfg = {**choose_config(m, w, device, tuned["kernel"]), **tuned}
        if cfg["LATE_SCALE"] and w.group_size % cfg["BLOCK_K"]:
            cfg["LATE_SCALE"] = False  # tuned on another group size: the scale goes back inside the tile
        return cfg
    if kernel is None:
        kernel = "gemv" if m <= GEMV_MAX_ROWS and per_code else "dot"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if interpreting():  # small tiles, so that tests run several tiles and splits
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16 * per if per_code else 32, num_warps=4, num_stages=1)
    elif kernel == "gemv":  # the sweep's best at one row
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=3)
    else:  # the sweep's best at 4 and 16 rows
        cfg = dict(BLOCK_M=16 if m <= 16 else 32 if m <= 32 else 64, BLOCK_N=128,
                   BLOCK_K=16 * per if per_code else 64, num_warps=4, num_stages=3)
    cfg["kernel"] = kernel
    cfg["PER_CODE"] = per_code  # (dot) BLOCK_K / per >= 16 rows per code position, as tl.dot needs
    cfg["LATE_SCALE"] = False
    cfg["GATHER"] = False
    return cfg


def _split(m_tiles: int, n_tiles: int, k_tiles: int, device: torch.device) -> int:
    # split K until the programs fill the SMs twice over, keeping at least two K tiles per split
    programs, split = m_tiles * n_tiles, 1
    while split < 16 and programs * split < 2 * _num_sms(device) and k_tiles >= 4 * split:
        split *= 2
    return split


def quant_matmul(x: Tensor, w: TritonQuantWeight, bias: Tensor | None = None, *,
                 dense_min_rows: int | None = None, config: dict | None = None) -> Tensor:
    """y = x @ ((c - z) * s).T + bias for x [M, in] (bf16, fp16 or fp32, contiguous rows) -> [M, out] in x's dtype.

    A fused kernel (`choose_config`; `config` overrides its choices, for tests and tuning: kernel
    "gemv" or "dot", BLOCK_*, SPLIT_K, PER_CODE, LATE_SCALE, GATHER, num_warps, num_stages), or
    the weight dequantized once into a scratch buffer and multiplied by torch.matmul: from
    `dense_min_rows` rows when given, else where this GPU's tuned table says "dense" (`tuned_configs`),
    else from DENSE_MIN_ROWS rows.
    """
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got {tuple(x.shape)}")
    if x.dtype != w.act_dtype:
        raise ValueError(f"x must be in the weight's activation dtype {w.act_dtype}, got {x.dtype}")
    if x.device != w.qweight.device:
        raise ValueError(f"x is on {x.device}, the weight on {w.qweight.device}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels run on CUDA tensors, got {x.device}; set TRITON_INTERPRET=1 before "
                           "Triton is first imported to run them on the CPU (slowly, for tests)")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, n, k = x.shape[0], w.out_features, w.in_features
    if m == 0:
        return x.new_empty(0, n)
    default = config is None and dense_min_rows is None
    plan = w.plans.get(m) if default else None
    if plan is None:
        if dense_min_rows is not None:
            dense = m >= dense_min_rows
        elif config is not None:
            dense = False
        else:
            tuned = _tuned(m, x.device)
            dense = m >= DENSE_MIN_ROWS if tuned is None else tuned["kernel"] == "dense"
        plan = "dense" if dense else _plan(m, w, x.device, config)
        if default:
            w.plans[m] = plan  # decode calls the same few row counts again and again: plan once
    if plan == "dense":
        y = torch.matmul(x, dequantize_t(w))
        return y if bias is None else y + bias.to(y.dtype)
    out = x.new_empty(m, n)
    kernel, grid, kw, (reduce_grid, block) = plan
    split = grid[2]
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    kernel[grid](x, w.qweight, w.scales, w.zeros, bias_arg, out, part, m, n, k, w.qweight.shape[0], x.stride(0),
                 out.stride(0), w.qweight.stride(0), w.scales.stride(0), HAS_BIAS=has_bias, **kw)
    if split > 1:
        _reduce_kernel[reduce_grid](part, bias_arg, out, m, n, out.stride(0), SPLIT_K=split, HAS_BIAS=has_bias,
                                    BLOCK=block)
    return out


def _plan(m: int, w: TritonQuantWeight, device: torch.device, config: dict | None):
    # (kernel, grid (M tiles, N tiles, splits), constexpr and launch kwargs, (reduce grid, its block)) for m rows
    cfg = {**choose_config(m, w, device, (config or {}).get("kernel")), **(config or {})}
    name = cfg.pop("kernel")
    gemv = name == "gemv"
    if gemv and w.group_size % (32 // w.bits):
        raise ValueError(f"the gemv kernel needs a group size that is a multiple of {32 // w.bits}")
    if cfg["LATE_SCALE"] and w.group_size % cfg["BLOCK_K"]:
        raise ValueError(f"LATE_SCALE needs one group per K tile: group size {w.group_size}, BLOCK_K {cfg['BLOCK_K']}")
    n, k = w.out_features, w.in_features
    m_tiles = m if gemv else triton.cdiv(m, cfg["BLOCK_M"])
    n_tiles, k_tiles = triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"])
    split = cfg.pop("SPLIT_K", None) or _split(m_tiles, n_tiles, k_tiles, device)
    kw = dict(BITS=w.bits, GROUP_SIZE=w.group_size, SPLIT_K=split, **cfg)
    if gemv:
        for key in ("BLOCK_M", "PER_CODE", "LATE_SCALE", "GATHER"):
            kw.pop(key, None)
        kernel = _qgemv_kernel
    else:
        kw.update(UPCAST=interpreting() and w.act_dtype != torch.float32,
                  DOT_PRECISION="ieee" if w.act_dtype == torch.float32 else "tf32")
        kernel = _qmm_kernel
    block = 256 if n >= 256 else triton.next_power_of_2(n)
    return kernel, (m_tiles, n_tiles, split), kw, ((m, triton.cdiv(n, block)), block)


def dequantize_t(w: TritonQuantWeight) -> Tensor:
    """The dense weight transposed, [in, out] contiguous, in the activation dtype (`_dequant_kernel`)."""
    out = torch.empty(w.in_features, w.out_features, dtype=w.act_dtype, device=w.qweight.device)
    block_n, block_w = (32, 8) if interpreting() else (128, 8)
    num_words = w.qweight.shape[0]
    grid = (triton.cdiv(num_words, block_w), triton.cdiv(w.out_features, block_n))
    _dequant_kernel[grid](w.qweight, w.scales, w.zeros, out, w.out_features, w.in_features, num_words,
                          w.qweight.stride(0), w.scales.stride(0), out.stride(0),
                          BITS=w.bits, GROUP_SIZE=w.group_size, BLOCK_N=block_n, BLOCK_W=block_w)
    return out


def dequantize(w: TritonQuantWeight) -> Tensor:
    """The dense weight [out, in] in the activation dtype (a transposed view of `dequantize_t`)."""
    return dequantize_t(w).t()
