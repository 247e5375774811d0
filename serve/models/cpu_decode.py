"""The whole decoder stack of a decode step in one C call, for CPU batches of a few sequences.

Why: after the weights are packed and the GEMV, attention, norm and RoPE kernels are in C, a
SmolLM2 decode step at batch 1 still spends ~2.5 of its ~11 ms (one thread) in Python and op
dispatch between them: ~12 calls per layer, each a few microseconds of wrappers. This module
builds one C function that runs those same kernels for every layer in turn (`slimlm_decode_stack`),
so a step is one ctypes call plus the embedding lookup and the LM head.

It runs the same kernels in the same order as the layer-by-layer path, so the results are
identical to it (bit for bit in our tests); `silu_mul` is the one kernel of its own, also used by
that path. It applies when every projection is a `PackedLinear` whose rows its GEMV reads or a
`QuantLinear` running slimlm's int4/int8 kernel in the model dtype (a GPTQ checkpoint; the stack calls
the same `slimlm_qlinear` with the layer's own arguments, so it equals the layer path too), the
family has no per-head q/k norm (Qwen3 takes the layer path), the step has rows of one token each
(decoding sequences, or the tokens of a speculative verify pass, which may start at a later layer), at
most GEMV_MAX_ROWS of them where a projection's weight is in oneDNN's layout (the layer path multiplies
more rows with oneDNN's GEMM, whose sums differ) and at most STACK_MAX_ROWS where every projection is in
slimlm's own bf16 layout or quantized (their kernels take any number of rows), the KV cache is in the
model dtype or an int8 `QuantizedKV` (each token quantized as it is stored, as `kv_quant.quantize_write`
does), and the C library builds (see `serve.kernels.cpu_build.build_cpu_kernels`; SLIMLM_CPU_KERNELS=0
turns it off).
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled
from ..layers import attention
from ..layers.compiled import compile_enabled, compiled, silu_mul_ref
from ..layers.kv_quant import is_quantized
from ..layers.linear import GEMV_MAX_ROWS, PackedLinear
from ..layers.quant_linear import QuantLinear


def silu_mul(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up for gate_up [N, 2 I] = gate | up -> [N, I], rounding where PyTorch's two ops round."""
    n, two_i = gate_up.shape
    i = two_i // 2
    if (gate_up.device.type == "cpu" and gate_up.dtype in (torch.bfloat16, torch.float32) and i % 16 == 0
            and gate_up.is_contiguous() and kernels_enabled() and (lib := _library()) is not None):
        out = gate_up.new_empty(n, i)
        fn = lib.slimlm_silu_mul_bf16 if gate_up.dtype == torch.bfloat16 else lib.slimlm_silu_mul_f32
        fn(gate_up.data_ptr(), out.data_ptr(), n, i, torch.get_num_threads())
        return out
    if compile_enabled(gate_up):
        return compiled(silu_mul_ref)(gate_up)
    return silu_mul_ref(gate_up)


# Rows a step may have in the stack where every projection's kernel takes any number of rows. Between a
# few rows and a few dozen the Python between the layer path's kernels is a share of the step: a SmolLM2
# step in the stack against the layer path (AVX2, 2 threads; a throwaway script alternating both limits,
# docs/benchmarks.md) was 1.13-1.30x faster in bf16 at 6-48 rows and 1.06x at 64; int4 1.15-1.44x and
# 1.05x. Past 64 rows: not measured.
STACK_MAX_ROWS = 64


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "in_norm", "post_norm", "qkv_w", "qkv_b", "o_w", "o_b", "gu_w", "gu_b", "down_w", "down_b",
        "qkv_q", "o_q", "gu_q", "down_q", "k_cache", "v_cache", "k_scale", "v_scale")]


class DecodeStack:
    """`slimlm_decode_stack` bound to one model's weights (built by `decode_stack_for`)."""

    def __init__(self, model, lib: ctypes.CDLL):
        a = model.args
        self.dtype = model.dtype
        self.bf16 = model.dtype == torch.bfloat16
        self.fn = lib.slimlm_decode_stack
        self.dims = (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size)
        self.eps = a.rms_norm_eps
        self.scale = a.head_dim ** -0.5
        ptr = lambda m: None if m is None else m.data_ptr()  # noqa: E731
        self.layers = (_Layer * a.num_layers)()
        # The most rows a step may have here: as many as the layer path sends through the same kernels
        # (any number for quantized layers and slimlm's own bf16 layout; GEMV_MAX_ROWS for oneDNN's).
        self.max_rows = STACK_MAX_ROWS
        for entry, layer in zip(self.layers, model.layers):
            for name, lin in (("qkv", layer.qkv_proj), ("o", layer.o_proj), ("gu", layer.gate_up_proj),
                              ("down", layer.down_proj)):
                if isinstance(lin, QuantLinear):  # its fixed kernel arguments, kept alive by the model
                    setattr(entry, f"{name}_q", lin._args_ptr)
                else:
                    setattr(entry, f"{name}_w", lin._gemv_weight)
                    setattr(entry, f"{name}_b", ptr(lin.bias))
                    if not lin.own_layout:
                        self.max_rows = GEMV_MAX_ROWS
            entry.in_norm = layer.input_norm.weight.data_ptr()
            entry.post_norm = layer.post_attention_norm.weight.data_ptr()
        self._caches: list | None = None  # the (k, v) data pointers the layers point at
        self._tensors: list | None = None  # plain-tensor caches bound last: a step with the same ones skips the checks

    def bind(self, kv_caches, n_layers: int) -> bool:
        """Point the layers at these caches; False where the kernels cannot read them (dtype, layout).

        Caches in the model dtype, or int8 `QuantizedKV`s (data and scales; a decode step writes one token
        per block, which is what the kernel's quantizing store needs)."""
        caches = kv_caches[:len(self.layers)]  # every layer given (the same list for draft and verify passes)
        if len(caches) < n_layers:
            return False
        if self._tensors is not None and len(caches) == len(self._tensors) and all(
                k is k0 and v is v0 for (k, v), (k0, v0) in zip(caches, self._tensors)):
            return True  # the very tensors bound last time (held here, so no other tensor can take their ids)
        quantized = all(is_quantized(k) and is_quantized(v) for k, v in caches)
        if not quantized and not all(isinstance(k, Tensor) and isinstance(v, Tensor) for k, v in caches):
            return False
        parts = [(k.data, v.data, k.scale, v.scale) if quantized else (k, v) for k, v in caches]
        ptrs = [tuple(t.data_ptr() for t in p) for p in parts]
        if ptrs == self._caches:
            return True
        k0 = parts[0][0]
        want = torch.int8 if quantized else self.dtype
        if not all(p[0].dtype == p[1].dtype == want and p[0].shape == p[1].shape == k0.shape
                   and all(t.is_contiguous() and t.device.type == "cpu" for t in p) for p in parts):
            return False
        if tuple(k0.shape[-2:]) != (self.dims[2], self.dims[3]):
            return False
        for entry, p in zip(self.layers, ptrs):
            entry.k_cache, entry.v_cache = p[0], p[1]
            entry.k_scale, entry.v_scale = (p[2], p[3]) if quantized else (None, None)
        self._caches = ptrs
        self._tensors = None if quantized else [(k, v) for k, v in caches]
        return True

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, kv_caches, meta, first: int, last: int) -> Tensor:
        """x [N, hidden] (the residual stream entering layer `first`, overwritten) -> the stream after
        layers [first, last).

        The caller checks `bind(kv_caches, last)` first (every step: pointers are cheap to compare,
        and a cache swapped under the same list must not be written through stale ones).
        """
        hidden, h, kvh, d, inter = self.dims
        m = x.shape[0]
        work = x.new_empty(m * (2 * hidden + (h + 2 * kvh) * d + 2 * h * d + 3 * inter + hidden))
        tables, lens, _ = attention.kernel_args(meta, kv_caches[0][0])
        layers = ctypes.addressof(self.layers) + first * ctypes.sizeof(_Layer)
        self.fn(layers, last - first, x.data_ptr(), m, hidden, h, kvh, d, inter, cos.data_ptr(), sin.data_ptr(),
                meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(), meta.block_size,
                self.scale, self.eps, work.data_ptr(), torch.get_num_threads(), int(self.bf16))
        return x


def decode_stack_for(model) -> DecodeStack | None:
    """The fused stack for `model`, or None where any of its conditions fails (see the module doc)."""
    a = model.args
    if not (kernels_enabled() and model.dtype in (torch.bfloat16, torch.float32) and model.device.type == "cpu"
            and a.head_dim % 32 == 0 and a.hidden_size % 16 == 0 and a.intermediate_size % 16 == 0
            and a.num_heads <= attention.KERNEL_MAX_HEADS and a.head_dim <= attention.KERNEL_MAX_HEAD_DIM):
        return None
    for layer in model.layers:
        if layer.qk_norm_weight is not None:
            return None
        for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            if not _runs_in_stack(lin, model.dtype):
                return None
    lib = _library()
    return None if lib is None else DecodeStack(model, lib)


def _runs_in_stack(lin, dtype: torch.dtype) -> bool:
    if isinstance(lin, QuantLinear):  # the stack calls slimlm_qlinear with the layer's own arguments
        return lin.uses_kernel and lin.act_dtype == dtype
    return (isinstance(lin, PackedLinear) and lin.uses_gemv and lin.dtype == dtype
            and (lin.bias is None or lin.bias.dtype == dtype))


def can_run(meta, n: int) -> bool:
    """A step the fused stack may run: decode only, at most STACK_MAX_ROWS rows (the stack's own
    `max_rows` may be fewer), int64 slots."""
    slots = meta.slot_mapping
    return (0 < n <= STACK_MAX_ROWS and meta.is_decode_only and slots.dtype == torch.int64
            and slots.is_contiguous() and slots.device.type == "cpu")


@functools.cache
def _library():
    lib = build_cpu_kernels("decode_stack")
    if lib is None:
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    for name in ("slimlm_silu_mul_bf16", "slimlm_silu_mul_f32"):
        getattr(lib, name).argtypes = [p, p, i, i, i]
        getattr(lib, name).restype = None
    lib.slimlm_decode_stack.argtypes = [p, i, p, i, i, i, i, i, i, p, p, p, p, i, p, i, f, f, p, i, i]
    lib.slimlm_decode_stack.restype = None
    return lib


