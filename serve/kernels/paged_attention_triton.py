"""Paged attention and the KV store in Triton: the GPU path of `serve.layers.attention`.

Same contract as `paged_attention` / `write_kv` (see `serve/layers/attention.py`): q [N, H, D] holds
one step's new tokens, laid end to end for S sequences; the caches are [num_blocks, block_size, KVH, D];
query head h reads KV head h // (H // KVH); the new tokens of sequence s are its last query_len
positions and see every position up to their own. The kernels:

- `_prefill_kernel`, for sequences with more than one new token (prefill, chunked prefill): one
  program per (query tile of one sequence, KV head). The tile's rows are (query, head of the KV
  head's group) pairs, so the G query heads sharing a KV head read each K/V tile once. It walks the
  sequence's positions in tiles of BLOCK_N (independent of the cache's block size: each position
  finds its block through the block table), with an online softmax and a causal mask at the offset.
- `_decode_kernel`, for sequences with one new token: one program per (sequence, KV head, split).
  With NUM_SPLITS > 1 each program covers a slice of the context (split-K, so that a few long
  sequences still fill the GPU) and writes a partial output and its log-sum-exp, which
  `_reduce_kernel` combines.
- `_store_kv_kernel`: K/V of the new tokens into their slots.

Softmax runs in base 2 (scores scaled by scale * log2 e, then exp2); accumulation is fp32 whatever
the input dtype (fp32, fp16, bf16).

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly: for tests). The variable must be
set before Triton is first imported: `triton.jit` reads it when it decorates, and Triton's own
helpers (`tl.zeros`, `tl.max`, ...) are decorated when Triton is imported.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting

if TYPE_CHECKING:
    from ..layers.attention import AttentionMetadata

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr,
    tile_seq_ptr, tile_q0_ptr,          # [T] each tile's sequence and first query (index within the sequence)
    query_start_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale,                           # scale * log2(e)
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,               # run the dots in fp32 (the interpreter cannot dot bf16)
    DOT_PRECISION: tl.constexpr,        # "ieee" for fp32 inputs (no TF32 rounding), else the default
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    row0 = tl.load(query_start_ptr + s)
    q_len = tl.load(query_start_ptr + s + 1) - row0
    seq_len = tl.load(seq_lens_ptr + s)
    cached = seq_len - q_len            # query i of the sequence sits at position cached + i

    # Row r of the tile: query q0 + r // G_PAD, head kvh * GROUP + r % G_PAD.
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G_PAD
    g = r % G_PAD
    head = kvh * GROUP + g
    row_ok = (qi < q_len) & (g < GROUP)
    pos = cached + qi                   # [BLOCK_M]
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_off = (row0 + qi).to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)

    # Every row sees position 0, so after the first tile each row's running max is finite.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    kv_end = tl.minimum(seq_len, cached + q0 + BLOCK_Q)  # one past the tile's last query position
    for n0 in range(0, kv_end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions
        j_ok = j < kv_end
        blk = tl.load(block_tables_ptr + s * stride_bt + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        within = j % BLOCK_SIZE
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + within * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_ptr + (blk * stride_vb + within * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_off = (row0 + qi).to(tl.int64)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_ptr, v_ptr,
    seq_ids_ptr,                        # [Sd] the decoding sequences
    query_start_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    s = tl.load(seq_ids_ptr + i)
    row = tl.load(query_start_ptr + s).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + s)

    g = tl.arange(0, G_PAD)
    head = kvh * GROUP + g
    g_ok = g < GROUP
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G_PAD, D_PAD]

    # This split's slice of the context, in whole tiles; trailing splits of a short sequence are empty.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        blk = tl.load(block_tables_ptr + s * stride_bt + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        within = j % BLOCK_SIZE
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (blk * stride_kb + within * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_N, D_PAD]
        v = tl.load(v_ptr + (blk * stride_vb + within * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        # G is small at decode (1-8 rows): broadcast-and-sum instead of a tensor-core dot.
        scores = tl.sum(q[:, None, :] * k[None, :, :], 2) * qk_scale  # [G_PAD, BLOCK_N]
        scores = tl.where(j_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_on + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # Partials: [Sd, H, NUM_SPLITS, D_PAD] normalized outputs and [Sd, H, NUM_SPLITS] base-2 log-sum-exps.
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        part = (i * NUM_HEADS + head) * NUM_SPLITS + split  # [G_PAD]
        tl.store(part_out_ptr + part[:, None] * D_PAD + d[None, :], out, mask=g_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=g_ok)


@triton.jit
def _reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_ids_ptr, query_start_ptr, stride_on, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(query_start_ptr + tl.load(seq_ids_ptr + i)).to(tl.int64)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_PAD)
    part = (i * NUM_HEADS + h) * NUM_SPLITS + sp
    lse = tl.load(part_lse_ptr + part)                      # [NUM_SPLITS]; split 0 is never empty
    w = tl.exp2(lse - tl.max(lse, 0))                       # empty splits weigh 0
    parts = tl.load(part_out_ptr + part[:, None] * D_PAD + d[None, :])  # [NUM_SPLITS, D_PAD]
    out = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    tl.store(out_ptr + row * stride_on + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
    KV_HEADS: tl.constexpr, KVH_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + n).to(tl.int64)
    blk = slot // BLOCK_SIZE
    within = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_PAD)
    d = tl.arange(0, D_PAD)
    mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    if slot >= 0:  # a negative slot marks a padding token
        k = tl.load(k_ptr + n * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(k_cache_ptr + blk * stride_kb + within * stride_ks + h[:, None] * stride_kch + d[None, :], k,
                 mask=mask)
        tl.store(v_cache_ptr + blk * stride_vb + within * stride_vs + h[:, None] * stride_vch + d[None, :], v,
                 mask=mask)


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _check_runnable(*tensors: Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"Triton kernels run on CUDA tensors, got {device}; to run them on the CPU "
                           "(slowly, for tests) set TRITON_INTERPRET=1 before Triton is first imported, "
                           "or use the PyTorch path (serve.layers.attention.paged_attention)")
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the last dimension must be contiguous (stride 1), got strides {t.stride()}")


class _Plan:
    """Step-constant launch data, built once per step (by the first layer) and kept on the metadata."""

    def __init__(self, meta: AttentionMetadata, block_q: int, device: torch.device):
        as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
        decode = [s for s, q in enumerate(meta.query_lens) if q == 1]
        tiles = [(s, q0) for s, q in enumerate(meta.query_lens) if q > 1 for q0 in range(0, q, block_q)]
        self.block_q = block_q
        self.num_decode = len(decode)
        self.decode_max_len = max((meta.seq_lens_list[s] for s in decode), default=0)
        self.decode_seq_ids = as_int(decode) if decode else None
        self.num_tiles = len(tiles)
        self.tile_seq = as_int([s for s, _ in tiles]) if tiles else None
        self.tile_q0 = as_int([q0 for _, q0 in tiles]) if tiles else None


def _plan(meta: AttentionMetadata, block_q: int, device: torch.device) -> _Plan:
    plan = getattr(meta, "_triton_plan", None)
    if plan is None or plan.block_q != block_q:
        plan = _Plan(meta, block_q, device)
        meta._triton_plan = plan  # AttentionMetadata is a plain dataclass; every layer of the step reuses it
    return plan


def _default_num_splits(plan: _Plan, kv_heads: int, block_n: int, device: torch.device) -> int:
    # Split only when sequences x KV heads leave the GPU's SMs idle, and only into slices of at
    # least 256 positions (a split costs a partial write and a reduce).
    if device.type != "cuda" or plan.num_decode == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = plan.num_decode * kv_heads
    splits = 1
    while splits < 16 and programs * splits < 2 * sms and plan.decode_max_len >= 2 * splits * max(256, block_n):
        splits *= 2
    return splits


def triton_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float, *,
                           block_q: int | None = None, block_n: int | None = None,
                           decode_block_n: int | None = None, num_splits: int | None = None) -> Tensor:
    """`paged_attention` in Triton: q [N, H, D], caches [num_blocks, block_size, KVH, D] -> [N, H, D].

    The step's K/V must already be in the caches (`triton_write_kv`). The keyword arguments are
    tile sizes, for tuning and tests (powers of two; on GPU the prefill tiles need
    block_q * next_pow2(H // KVH) >= 16 and block_n >= 16): `block_q` queries per prefill tile,
    `block_n` / `decode_block_n` positions per K/V tile, `num_splits` decode split-K slices.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [N, H, D] and two caches [num_blocks, block_size, KVH, D] of one shape, "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    n, h, d = q.shape
    _, block_size, kvh, d_cache = k_cache.shape
    if d != d_cache or h % kvh != 0:
        raise ValueError(f"q has {h} heads of {d}; the cache has {kvh} KV heads of {d_cache}: head sizes must "
                         "match and the query heads must be a multiple of the KV heads")
    if block_size != meta.block_size:
        raise ValueError(f"the cache holds blocks of {block_size} positions but the metadata says {meta.block_size}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    _check_runnable(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens)
    out = q.new_empty(n, h, d)
    if n == 0:
        return out

    group = h // kvh
    g_pad, d_pad = _pow2(group), max(16, _pow2(d))
    block_q = block_q or max(1, 64 // g_pad)
    block_n = block_n or (64 if d_pad <= 128 else 32)
    decode_block_n = decode_block_n or max(16, min(128, _pow2(8192 // (g_pad * d_pad))))
    plan = _plan(meta, block_q, q.device)
    splits = num_splits or _default_num_splits(plan, kvh, decode_block_n, q.device)
    tiles = {"block_q": block_q, "block_n": block_n, "decode_block_n": decode_block_n, "num_splits": splits}
    if any(v < 1 or v & (v - 1) for v in tiles.values()):
        raise ValueError(f"tile sizes and num_splits must be powers of two, got {tiles}")
    qk_scale = scale * LOG2E
    query_start, seq_lens, tables = meta.query_start_loc, meta.seq_lens, meta.block_tables
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
               tables.stride(0))

    if plan.num_tiles:
        _prefill_kernel[(plan.num_tiles, kvh)](
            out, q, k_cache, v_cache, plan.tile_seq, plan.tile_q0, query_start, seq_lens, tables, qk_scale, *strides,
            BLOCK_SIZE=block_size, HEAD_DIM=d, D_PAD=d_pad, GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q,
            BLOCK_N=block_n, UPCAST=interpreting() and q.dtype == torch.bfloat16,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if plan.num_decode:
        part_out = part_lse = out  # unused when there is one split
        if splits > 1:
            part_out = torch.empty(plan.num_decode, h, splits, d_pad, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(plan.num_decode, h, splits, dtype=torch.float32, device=q.device)
        _decode_kernel[(plan.num_decode, kvh, splits)](
            out, part_out, part_lse, q, k_cache, v_cache, plan.decode_seq_ids, query_start, seq_lens, tables,
            qk_scale, *strides, NUM_HEADS=h, BLOCK_SIZE=block_size, HEAD_DIM=d, D_PAD=d_pad, GROUP=group,
            G_PAD=g_pad, BLOCK_N=decode_block_n, NUM_SPLITS=splits)
        if splits > 1:
            _reduce_kernel[(plan.num_decode, h)](
                out, part_out, part_lse, plan.decode_seq_ids, query_start, out.stride(0), out.stride(1),
                NUM_HEADS=h, HEAD_DIM=d, D_PAD=d_pad, NUM_SPLITS=splits)
    return out


def triton_write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """`write_kv` in Triton: k, v [N, KVH, D] into slots `slot_mapping` [N] of the caches.

    A negative slot skips its token (a padding row, as in a CUDA graph padded to a fixed batch).
    """
    if k.shape != v.shape or k_cache.shape != v_cache.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"expected k, v [N, KVH, D] and caches [num_blocks, block_size, KVH, D] of matching "
                         f"shapes, got k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must hold one slot per token ({k.shape[0]}), got {tuple(slot_mapping.shape)}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"k, v and the caches must share a dtype, got {k.dtype}, {v.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    _check_runnable(k, v, k_cache, v_cache, slot_mapping)
    n, kvh, d = k.shape
    if n == 0:
        return
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        KV_HEADS=kvh, KVH_PAD=_pow2(kvh), HEAD_DIM=d, D_PAD=_pow2(d), BLOCK_SIZE=k_cache.shape[1])
