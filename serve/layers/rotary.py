"""Rotary position embeddings (RoPE), with the frequency scalings of the Llama family.

Tables of cos and sin per position are computed once (float32, as Hugging Face computes them, then
cast to the model dtype) and grown on demand; a step looks its positions up once and every layer
reuses the rows. The rotation uses the "rotate half" layout of Hugging Face checkpoints: dimension
i pairs with i + D/2.

`rope_write_kv` is the decode-time fusion of the step after the q/k/v projection: rotate q and k,
store k and v in the paged cache. On CPU one C kernel call does it (~3 us a token instead of ~18
for the views, rotation and two `index_copy_`), rounding where the PyTorch ops round (bit-identical
to them in our tests). An int8 cache (`QuantizedKV`) takes the PyTorch path, which quantizes as it writes.
"""
from __future__ import annotations

import ctypes
import functools
import math

import torch
from torch import Tensor, nn

from .attention import write_kv
from .compiled import compile_enabled, compiled
from .kv_quant import QuantizedKV, is_quantized
from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, rope_parameters: dict) -> Tensor:
    """Inverse frequencies [head_dim // 2] for `rope_parameters` (transformers 5 `config.rope_parameters`).

    Supports rope_type "default", "linear" (positions divided by `factor`) and "llama3" (Llama 3.1:
    long wavelengths divided by `factor`, short ones kept, a smooth blend between).
    """
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported by slimlm's runtime; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}. Serve this model with transformers or vLLM.")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by slimlm's runtime")
    base = float(rope_parameters.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / rope_parameters["factor"]
    if rope_type == "llama3":
        factor = rope_parameters["factor"]
        low, high = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
        old_len = rope_parameters["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin lookup for positions, and the rotation itself (`apply_rotary`)."""

    def __init__(self, inv_freq: Tensor, max_positions: int = 4096, dtype: torch.dtype = torch.float32):
        super().__init__()
        # Kept in float32 on the host: tables are rebuilt from it when positions outgrow them.
        self.inv_freq = inv_freq.float().cpu()
        self.dtype = dtype
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]           # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [P, D]
        half = freqs.shape[-1]
        # rotate_half(x) * sin == roll(x, D/2) * [-sin | sin]: fold the sign into the table.
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        device = self.cos.device
        self.cos = emb.cos().to(device=device, dtype=self.dtype)
        self.sin = (emb.sin() * sign).to(device=device, dtype=self.dtype)

    def forward(self, positions: Tensor, max_position: int | None = None) -> tuple[Tensor, Tensor]:
        """positions [N] -> (cos, sin), each [N, 1, D], broadcastable over heads.

        `max_position` (a host int, the largest position in `positions`) lets the tables grow
        without reading the device; without it they must already cover every position.
        """
        if max_position is not None and max_position >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], max_position + 1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [N, heads, D] by position: x * cos + rotate_half(x) * sin, with the sign inside `sin`.
    On CUDA it runs compiled into one kernel (`compiled.py`)."""
    if compile_enabled(x):
        return compiled(reference_rotary)(x, cos, sin)
    return reference_rotary(x, cos, sin)


def reference_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`apply_rotary` in PyTorch ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor | QuantizedKV, v_cache: Tensor | QuantizedKV,
                  slot_mapping: Tensor, num_heads: int, one_token_per_block: bool = False) -> Tensor:
    """Rotate and store: qkv [N, (H + 2 KVH) * D] (the fused projection) -> q [N, H, D], rotated.

    Writes the rotated keys and the values into cache slots `slot_mapping` [N] of k_cache, v_cache
    [num_blocks, block_size, KVH, D] (plain, or int8 `QuantizedKV`); cos, sin [N, 1, D] from `RotaryEmbedding`.
    `one_token_per_block`: no two tokens write the same block (a decode step), which lets the C kernel
    quantize an int8 cache's writes one token at a time exactly as `quantize_write` does.
    """
    n = qkv.shape[0]
    kvh, d = k_cache.shape[-2:]
    if (kernel := _kernel_for(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, one_token_per_block)) is not None:
        q = qkv.new_empty(n, num_heads, d)
        if is_quantized(k_cache):
            kernel(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q.data_ptr(),
                   k_cache.data.data_ptr(), v_cache.data.data_ptr(), k_cache.scale.data_ptr(), v_cache.scale.data_ptr(),
                   n, num_heads, kvh, d, k_cache.data.shape[1], int(qkv.dtype == torch.bfloat16))
        else:
            kernel(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q.data_ptr(),
                   k_cache.data_ptr(), v_cache.data_ptr(), n, num_heads, kvh, d, torch.get_num_threads())
        return q
    qkv = qkv.view(n, num_heads + 2 * kvh, d)
    qk = apply_rotary(qkv[:, :num_heads + kvh], cos, sin)                  # [N, H + KVH, D]
    write_kv(qk[:, num_heads:], qkv[:, num_heads + kvh:], k_cache, v_cache, slot_mapping)
    return qk[:, :num_heads]


def _kernel_for(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, one_token_per_block=False):
    # The kernel trusts slot_mapping to lie inside the cache: the model checks it once per step.
    quantized = is_quantized(k_cache) and is_quantized(v_cache)
    if quantized:  # int8: only where each token has a block of its own (see rope_write_kv)
        if not one_token_per_block:
            return None
        caches_ok = all(c.data.is_contiguous() and c.scale.is_contiguous() and c.data.device.type == "cpu"
                        for c in (k_cache, v_cache))
        tensors = (qkv, cos, sin)
    elif isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor):
        caches_ok = True
        tensors = (qkv, cos, sin, k_cache, v_cache)
    else:
        return None
    kvh, d = k_cache.shape[-2:]
    dtype = qkv.dtype
    if not (caches_ok and qkv.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and d % 32 == 0
            and d <= 256 and qkv.dim() == 2 and qkv.shape[1] == (num_heads + 2 * kvh) * d
            and all(t.dtype == dtype and t.is_contiguous() for t in tensors)
            and cos.numel() == sin.numel() == qkv.shape[0] * d and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous() and kernels_enabled()):
        return None
    lib = _library()
    if lib is None:
        return None
    if quantized:
        return lib.slimlm_rope_write_kv_q8
    return lib.slimlm_rope_write_kv_bf16 if dtype == torch.bfloat16 else lib.slimlm_rope_write_kv_f32


@functools.cache
def _library():
    lib = build_cpu_kernels("rope")
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    for name in ("slimlm_rope_write_kv_bf16", "slimlm_rope_write_kv_f32"):
        getattr(lib, name).argtypes = [p, p, p, p, p, p, p, i, i, i, i, i]
        getattr(lib, name).restype = None
    lib.slimlm_rope_write_kv_q8.argtypes = [p, p, p, p, p, p, p, p, p, i, i, i, i, i, i]
    lib.slimlm_rope_write_kv_q8.restype = None
    return lib


