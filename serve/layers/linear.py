"""The linear layer seam: every projection in `serve.models` is built by a `LinearFactory`.

The default, `make_linear`, returns a `PackedLinear` where oneDNN can hold the weight (a CPU weight
in bfloat16 or float32), else a `Linear` that calls `F.linear`. A quantized weight format plugs in
by passing its own factory to `CausalLM.from_hf(..., make_linear=...)`: it receives the (already
fused) weight and bias and returns any module mapping [N, in] -> [N, out].

Why: decode multiplies each weight by a handful of rows, so it is bound by how fast the weight
streams from memory. Measured on the 2-core AVX-512-BF16 CI machine, SmolLM2-135M's layer weights,
one thread, one row: `F.linear` streams bf16 at ~13 GB/s and fp32 at ~15-17 (MKL takes a slow path
on this AMD CPU); oneDNN's inner product on a weight reordered once into its blocked layout reaches
~25 GB/s in bf16 (~20 in fp32) and is 2x faster than MKL for fp32 prefill; and the small kernel
below, which reads that same packed buffer, reaches ~35 GB/s in bf16 and ~28 in fp32 (two threads:
40-55 GB/s in bf16, against ~30 for oneDNN; the machine's read bandwidth is ~46). So the weight is
held once, in oneDNN's layout; up to GEMV_MAX_ROWS rows go through the kernel, more rows (prefill,
large decode batches: compute-bound, where oneDNN runs near the CPU's peak) through oneDNN.

The kernel (C, serve/kernels/cpu/gemv.c, built by `build_cpu_kernels`: compiled with the system's C
compiler on first use and cached, for AVX-512 or AVX2) computes what oneDNN computes: bf16 products
summed in float32 (`vdpbf16ps`, in oneDNN's order: bit-identical to oneDNN's at one row in our tests,
within a rounding step at a few) plus the bias, rounded once; fp32 in float32 with its own summation
order. Anything missing (no compiler, a layout it does not recognise) falls back to oneDNN;
SLIMLM_CPU_KERNELS=0 turns slimlm's C kernels off, SLIMLM_PACK_LINEAR=0 the packing (plain `F.linear`).

Without AVX-512 (AVX2 CPUs, AMD Zen 1-3 among them) oneDNN does not pack bf16 and `F.linear` in bf16
is compute-bound (~6-10 GB/s at one row on a 2-core AMD EPYC with AVX2). There slimlm lays the weight
out itself, in the same blocked layout, and its kernel's AVX2 form takes every row: measured on that
machine, SmolLM2-135M's projections, two threads, 3-4x `F.linear` at one to four rows (20-28 GB/s at
one) and 5x at 128 rows (as fast as float32 `F.linear`, at half the bytes).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled

LinearFactory = Callable[[Tensor, "Tensor | None"], nn.Module]

PACKED_DTYPES = (torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 4  # above this oneDNN's blocked GEMM wins (bf16 and fp32, 1-2 threads, measured)


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


class PackedLinear(nn.Module):
    """`Linear` on a weight held only in oneDNN's blocked layout (CPU, bfloat16 or float32).

    The dense weight is not kept (one copy of the weights in memory, not two); `weight` rebuilds it
    on demand, as a copy. The module cannot move to another device: build it where it will run.
    `uses_gemv` says whether inputs of up to GEMV_MAX_ROWS rows take slimlm's kernel.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, use_gemv: bool | None = None):
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"PackedLinear needs a 2-D CPU weight in {PACKED_DTYPES} with oneDNN available (for "
                             "bf16 without AVX-512: out % 64 == 0 and in % 32 == 0, and slimlm's kernels); "
                             f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}. Use Linear instead.")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        self._gemv = None
        if use_gemv is None:
            use_gemv = kernels_enabled()
        lib = gemv_library() if use_gemv and (bias is None or bias.dtype == self.dtype) else None
        self.own_layout = False  # True: `packed` is slimlm's copy of the layout, every row runs the kernel
        try:
            # The batch-size hint picks the blocked layout; 1 (decode) measured as fast as 32 or 128 at those sizes.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        except RuntimeError:
            # oneDNN cannot hold bf16 without AVX-512 (or AVX-NE-CONVERT): where slimlm's kernel runs (its
            # AVX2 form), the weight is laid out as oneDNN would have, by slimlm, and the kernel takes every row.
            own = reference_packed_layout(weight.detach()) if lib is not None and self.dtype == torch.bfloat16 else None
            if own is None:
                raise
            self.packed = own.contiguous().clone()
            self.own_layout = True
        known = self.own_layout or _packed_layout_is_known(self.packed, weight)
        # The flat bytes in the kernel's layout, where they are in it (for `rows`; valid while `packed` lives).
        self._flat = None if not known else self.packed if self.own_layout else packed_view(self.packed)
        if lib is not None and known:
            self._gemv = lib.slimlm_gemv_bf16 if self.dtype == torch.bfloat16 else lib.slimlm_gemv_f32
            self._gemv_weight = self.packed.data_ptr() if self.own_layout else torch.ops.mkldnn.data_ptr(self.packed)

    @property
    def uses_gemv(self) -> bool:
        return self._gemv is not None

    @property
    def weight(self) -> Tensor:
        """The dense weight [out, in], unpacked anew on each access (for inspection, not for compute)."""
        if self.own_layout:  # [out/64][in/32][16][64][2] back to [out][in]
            o, i = self.out_features, self.in_features
            return self.packed.reshape(o // 64, i // 32, 16, 64, 2).permute(0, 3, 1, 2, 4).reshape(o, i).clone()
        return self.packed.to_dense()

    @property
    def has_rows(self) -> bool:
        """Whether `rows` can read the weight's rows from the packed layout (oneDNN's opaque ones: no)."""
        return self._flat is not None

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` [N] of the weight, [N, in], gathered from the packed layout: a tied embedding looks its
        tokens up here, where a dense copy beside the head's would hold the matrix twice."""
        o, i = self.out_features, self.in_features
        if self.dtype == torch.float32:  # the kernel's fp32 layout is row-major
            return self._flat.view(o, i)[ids]
        # bf16: [out/64][in/32][16][64][2], row r at block r // 64, place r % 64; each pair of inputs read as
        # one int32 (a gather of 2-byte elements ran 2.6x slower at 2,048 rows)
        ids = ids.long()
        pairs = self._flat.view(torch.int32).view(o // 64, i // 32, 16, 64).permute(0, 3, 1, 2)
        return pairs[ids // 64, ids % 64].reshape(-1, i // 2).view(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, in] -> [N, out]
        x = x.contiguous()
        n = x.shape[0]
        if self._gemv is not None and (n <= GEMV_MAX_ROWS or self.own_layout) and x.dim() == 2 and x.dtype == self.dtype:
            y = x.new_empty(n, self.out_features)
            self._gemv(self._gemv_weight, x.data_ptr(), y.data_ptr(),
                       None if self.bias is None else self.bias.data_ptr(),
                       n, self.out_features, self.in_features, torch.get_num_threads())
            return y
        if self.own_layout:  # an input the kernel does not take (another dtype, not 2-D): correct, not fast
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, packed={'slimlm' if self.own_layout else 'oneDNN'}, gemv={self.uses_gemv}")


def can_pack(weight: Tensor) -> bool:
    """True where `PackedLinear` can hold `weight`: 2-D, CPU, bfloat16/float32, oneDNN built in and enabled,
    and either oneDNN reorders that dtype on this CPU or slimlm's kernel takes the weight in its own copy
    of the layout (bf16 without AVX-512)."""
    if not (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return _onednn_reorders(weight.dtype) or (
        weight.dtype == torch.bfloat16 and kernels_enabled() and gemv_library() is not None
        and _has_kernel_layout(weight))


@functools.cache
def _onednn_reorders(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` on this CPU (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(64, 32, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


def packing_enabled() -> bool:
    """Packing is on unless the environment variable SLIMLM_PACK_LINEAR is set to 0."""
    return os.environ.get("SLIMLM_PACK_LINEAR", "1") != "0"


def make_linear(weight: Tensor, bias: Tensor | None = None) -> nn.Module:
    """The dense default `LinearFactory`: oneDNN-packed where possible, plain `F.linear` otherwise."""
    if packing_enabled() and can_pack(weight):
        try:
            return PackedLinear(weight, bias)
        except RuntimeError:  # an oneDNN build that cannot reorder this shape/dtype: the plain path works
            pass
    return Linear(weight, bias)


# ---- the kernel --------------------------------------------------------------------------------------

def packed_view(packed: Tensor) -> Tensor:
    """The raw buffer of a oneDNN-packed weight as a flat dense tensor (no copy; valid while `packed` lives)."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    raw = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(raw, dtype=packed.dtype)


def reference_packed_layout(weight: Tensor) -> Tensor | None:
    """The flat layout the kernel reads, or None where it has none for this weight.

    bf16: oneDNN's AB16b64a2b, i.e. [out/64][in/32][16][64][2]: blocks of 64 output rows, and within
    them pairs of inputs side by side per row (one 64-byte load = 16 rows x 2 inputs, what `vdpbf16ps`
    multiplies). fp32: plain row-major [out][in].
    """
    if not _has_kernel_layout(weight):
        return None
    out_f, in_f = weight.shape
    if weight.dtype == torch.float32:
        return weight.reshape(-1)
    return weight.reshape(out_f // 64, 64, in_f // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(-1)


def _has_kernel_layout(weight: Tensor) -> bool:
    """Whether the kernel has a layout for this weight's shape and dtype (what `reference_packed_layout` needs)."""
    out_f, in_f = weight.shape
    return in_f % 16 == 0 if weight.dtype == torch.float32 else out_f % 64 == 0 and in_f % 32 == 0


def _packed_layout_is_known(packed: Tensor, weight: Tensor) -> bool:
    # oneDNN picks the layout per shape, ISA and version: use the kernel only where the bytes are
    # exactly the layout it reads (checked once per weight, at load).
    expected = reference_packed_layout(weight.detach())
    if expected is None or torch.ops.mkldnn._nbytes(packed) != expected.numel() * expected.element_size():
        return False
    return bool(torch.equal(packed_view(packed), expected))


@functools.cache
def gemv_library() -> ctypes.CDLL | None:
    """The GEMV kernels of `serve/kernels/cpu/gemv.c` (see `build_cpu_kernels`), or None where they cannot run."""
    lib = build_cpu_kernels("gemv")
    if lib is None:
        return None
    for name, ptr in (("slimlm_gemv_bf16", ctypes.c_void_p), ("slimlm_gemv_f32", ctypes.c_void_p)):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = None
    return lib
