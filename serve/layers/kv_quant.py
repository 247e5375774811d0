"""An int8 paged KV cache with one scale per (block, KV head): half the memory of bf16, a quarter of fp32.

Why: the KV cache, not the weights, is what bounds how many sequences run at once. Storing K and V
as int8 doubles the blocks a memory budget holds against bf16 (see `kv_block_bytes`), for a small
perplexity cost (measured by `scripts/kv_cache_ppl.py`).

Layout, per layer and for K and V alike (`QuantizedKV`):
  data  [num_blocks, block_size, KVH, D] int8, the same slot layout as a plain cache;
  scale [num_blocks, KVH] float32, so x ~= data * scale for every slot of that block and head.
A scale lives with its block id, so everything that shares or moves blocks by id carries it along:
prefix-cached and forked blocks are shared as they are, and `copy_blocks_` (copy-on-write) copies
the scales with the data.

Writing. Tokens reach a block one decode step at a time, so a (block, head)'s scale follows the
running max-abs / 127 of what was written to it. When a new token needs a larger scale, the scale
grows to at least 1.25x its old value (`_GROWTH`) and the entries already there are re-quantized to
it (round(q * old / new)), which rounds them again: an entry's error is at most half the sum of
the scales it has been rounded at, so at most 2.5x the final scale (a geometric series) and at
most (1 + R) / 2 of it, R being how often its block-head's scale grew after it was written. A
fresh block starts at exactly its first tokens' max, and a prefill chunk quantizes a block's tokens
together, with no re-rounding.
Why the 1.25x step, measured with `scripts/kv_cache_ppl.py`'s windowing (SmolLM2 fp32, 48 windows
of 512 wiki tokens, blocks of 16): one-shot quantization of whole blocks (chunks of 64) costs
+0.10% perplexity, but growing the scale to exactly the running max when decoding token by token
costs +0.30%: scales grow on ~17% of writes, often by a few percent, and re-rounding q by a ratio
close to 1 leaves small |q| unchanged, so old entries drift. Steps of at least 1.25x: +0.08% (the
same as one-shot); 1.35x +0.13%, 1.5x +0.20%, powers of two +0.18% (coarser scales cost more than
the re-rounding they save). A scale fixed by a block's first token would clip later, larger tokens;
keeping a float copy of the open block to re-quantize from would defeat the memory saving. One
consequence: the cache's bits depend on how a block's tokens were split into steps, so unlike a
float cache, recomputing a preempted sequence or prefilling a prompt in other chunks can change the
last bits of its K/V (and, rarely, a greedy token).

A block whose slot 0 is written restarts at scale 0: blocks fill in position order and a copy
brings its own scale, so slot 0 is only ever written by a new owner, and a freed block that is
reused does not inherit the old owner's (possibly much larger) scale. Nothing else has to tell the
cache which blocks are fresh.

Reading and writing in C: slimlm's attention kernel reads the int8 cache in place
(`slimlm_decode_attention_kv8`: a key's block scale multiplies its score, a value's its softmax
weight, so each int8 is loaded once), and in a decode step (one token per block) rotary's fused
store quantizes each token as `quantize_write` does, bit for bit (`slimlm_rope_write_kv_q8`), in the
fused decode stack too. Prefill chunks quantize in PyTorch (several tokens of a block grow its scale
once). Without the C kernels (or on a GPU) the gathered slots are dequantized on the fly
(`gather_slots`), in the activation dtype. Decode with an int8 cache runs at 0.9-1.0x the bf16
cache's speed (docs/benchmarks.md). On a GPU the write syncs once per call (it asks whether any
scale grew), acceptable next to the PyTorch attention it feeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KV_CACHE_DTYPES = ("auto", "int8")
_QMAX = 127.0  # symmetric: -127..127, so -x quantizes to -q
_GROWTH = 1.25  # a scale that must grow grows at least this much (see the module doc)


@dataclass(frozen=True)
class QuantizedKV:
    """One layer's K (or V) cache in int8 with per-block, per-head float32 scales (see the module doc)."""

    data: Tensor   # [num_blocks, block_size, KVH, D] int8
    scale: Tensor  # [num_blocks, KVH] float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole cache as floats [num_blocks, block_size, KVH, D] (for tests and references)."""
        return (self.data.float() * self.scale[:, None, :, None]).to(dtype)

    @classmethod
    def zeros(cls, shape: tuple[int, int, int, int], device=None) -> QuantizedKV:
        """An empty cache of `shape` [num_blocks, block_size, KVH, D]: all data and scales 0."""
        num_blocks, _, kvh, _ = shape
        return cls(torch.zeros(shape, dtype=torch.int8, device=device),
                   torch.zeros(num_blocks, kvh, dtype=torch.float32, device=device))


def is_quantized(cache) -> bool:
    return isinstance(cache, QuantizedKV)


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """"auto" -> the model's dtype; "int8" -> torch.int8 (a `QuantizedKV` cache). ValueError otherwise."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "int8":
        return torch.int8
    raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported; choose one of "
                     f"{', '.join(KV_CACHE_DTYPES)} ('auto' keeps the model's dtype)")


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers, K and V, scales included (int8: 4 bytes per head)."""
    per_cache = block_size * num_kv_heads * head_dim * dtype.itemsize
    if dtype == torch.int8:
        per_cache += num_kv_heads * 4
    return 2 * num_layers * per_cache


def cache_nbytes(cache: Tensor | QuantizedKV) -> int:
    return cache.nbytes() if is_quantized(cache) else cache.numel() * cache.element_size()


def copy_blocks_(cache: Tensor | QuantizedKV, src: Tensor, dst: Tensor) -> None:
    """Copy blocks `src` [M] over blocks `dst` [M] in place, scales included (copy-on-write)."""
    if is_quantized(cache):
        cache.data[dst] = cache.data[src]
        cache.scale[dst] = cache.scale[src]
    else:
        cache[dst] = cache[src]


@dataclass
class WritePlan:
    """Which blocks one write touches, shared by the K and V writes of a layer (`write_plan`)."""

    blocks: Tensor   # [U] distinct block ids written
    inverse: Tensor  # [N] index into `blocks` of each token
    fresh: Tensor    # [U] bool: slot 0 is written, so the block-head scales restart at 0


def write_plan(slot_mapping: Tensor, block_size: int) -> WritePlan:
    """Group the step's slots [N] by block (any order; a block may take several tokens)."""
    blocks, inverse = torch.unique(slot_mapping // block_size, return_inverse=True)
    fresh = torch.zeros(blocks.shape[0], dtype=torch.bool, device=slot_mapping.device)
    fresh[inverse[slot_mapping % block_size == 0]] = True
    return WritePlan(blocks, inverse, fresh)


def quantize_write(x: Tensor, cache: QuantizedKV, slot_mapping: Tensor, plan: WritePlan | None = None) -> None:
    """Store x [N, KVH, D] (any float dtype) into slots `slot_mapping` [N] of `cache`, raising scales as needed."""
    n, kvh, d = x.shape
    if n == 0:
        return
    plan = plan or write_plan(slot_mapping, cache.data.shape[1])
    old = cache.scale.index_select(0, plan.blocks).masked_fill_(plan.fresh[:, None], 0.0)  # [U, KVH]
    amax = x.detach().abs().amax(dim=-1).float()                                          # [N, KVH]
    index = plan.inverse[:, None].expand(n, kvh)                                           # [N, KVH]
    step_max = torch.zeros_like(old).scatter_reduce_(0, index, amax, "amax")               # [U, KVH]
    need = step_max / _QMAX                                                                # [U, KVH]
    new = torch.where(need > old, torch.maximum(need, old * _GROWTH), old)                 # fresh: old = 0
    grown = (new > old) & (old > 0)
    if bool(grown.any()):
        # Re-quantize the entries already in each grown (block, head) to its new scale.
        u, h = grown.nonzero(as_tuple=True)                                                # [M] each
        b = plan.blocks[u]
        ratio = (old[u, h] / new[u, h])[:, None, None]                                      # [M, 1, 1]
        cache.data[b, :, h, :] = torch.round(cache.data[b, :, h, :].float() * ratio).to(torch.int8)  # [M, BS, D]
    cache.scale.index_copy_(0, plan.blocks, new)
    # A (block, head) whose scale is still 0 has received only zeros: divide by 1 instead.
    safe = torch.where(new > 0, new, torch.ones_like(new)).index_select(0, plan.inverse)   # [N, KVH]
    q = torch.round(x.float() / safe[:, :, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)    # [N, KVH, D]
    cache.data.view(-1, kvh, d).index_copy_(0, slot_mapping, q)


def gather_slots(cache: Tensor | QuantizedKV, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """The cached K or V of `slots` [M] as [M, KVH, D] in `dtype` (int8 caches dequantized on the fly)."""
    kvh, d = cache.shape[-2:]
    if not is_quantized(cache):
        return cache.view(-1, kvh, d).index_select(0, slots)
    block_size = cache.data.shape[1]
    q = cache.data.view(-1, kvh, d).index_select(0, slots)                     # [M, KVH, D] int8
    s = cache.scale.index_select(0, torch.div(slots, block_size, rounding_mode="floor"))  # [M, KVH]
    return (q.float() * s[:, :, None]).to(dtype)
