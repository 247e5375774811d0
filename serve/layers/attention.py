"""Attention over a paged KV cache, for one engine step over a flattened batch.

An engine step runs N new tokens that belong to S sequences, laid end to end (no padding):
some sequences are decoding (one new token), others are prefilling a chunk of their prompt.
Each layer's cache is a pair `[num_blocks, block_size, KVH, D]` (tensors in the model dtype, or
int8 `QuantizedKV`s with per-block scales, see `kv_quant.py`); a sequence owns a
list of blocks (its row of `block_tables`), so its token at position p lives in slot
`block_tables[s, p // block_size] * block_size + p % block_size` of the flattened cache.

The step writes the new tokens' K/V into the cache first (`write_kv`), then every query reads its
whole context back from the cache (`paged_attention`), so cached and new tokens take one path.
Everything that depends only on the step (which slots to gather, the masks) is computed once per
step, on the first layer, and reused by the others: at batch-1 decode that keeps each layer at a
gather of K, a gather of V and one `scaled_dot_product_attention` call.

`reference_paged_attention` is the plain loop it is tested against.
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import use_triton
from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled
from .kv_quant import QuantizedKV, gather_slots, is_quantized, quantize_write, write_plan


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the batch and in the cache. Built once per step, shared by all layers.

    Tensors (on the model's device):
      slot_mapping:    [N]   cache slot of each new token (`block_id * block_size + offset`).
      query_start_loc: [S+1] cumulative new-token counts; sequence s owns rows
                             `query_start_loc[s]:query_start_loc[s+1]` of the flattened batch.
      seq_lens:        [S]   context length of each sequence INCLUDING this step's tokens.
      block_tables:    [S, max_blocks] block ids of each sequence, padded with any valid id (e.g. 0).
    Host-side copies (Python ints, so the attention never waits on the device to learn a shape):
      query_lens:      new tokens per sequence; derived from `query_start_loc` when left out.
      seq_lens_list:   `seq_lens` as a list; derived when left out.
    """

    slot_mapping: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    block_size: int
    query_lens: list[int] | None = None
    seq_lens_list: list[int] | None = None
    # Per-step gather indices and masks, built by the first layer that needs them.
    _plan: _Plan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.query_lens is None:
            self.query_lens = torch.diff(self.query_start_loc).tolist()
        if self.seq_lens_list is None:
            self.seq_lens_list = self.seq_lens.tolist()
        if len(self.query_lens) != len(self.seq_lens_list):
            raise ValueError(f"query_lens has {len(self.query_lens)} sequences but seq_lens has "
                             f"{len(self.seq_lens_list)}; both must describe the same S sequences")

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str | None = None) -> AttentionMetadata:
        """Fill every field from host lists: the new tokens of sequence s are its last `query_lens[s]` positions.

        `block_tables[s]` must hold at least `ceil(seq_lens[s] / block_size)` block ids.
        """
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            if len(table) * block_size < s_len:
                raise ValueError(f"a sequence of {s_len} tokens needs {math.ceil(s_len / block_size)} "
                                 f"blocks of {block_size}, but its block table has {len(table)}")
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(s_len - q_len, s_len))
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(slot_mapping=as_long(slots), query_start_loc=as_long(starts),
                   seq_lens=as_long(list(seq_lens)), block_tables=as_long(padded).view(len(padded), width),
                   block_size=block_size, query_lens=list(query_lens), seq_lens_list=list(seq_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @property
    def last_token_indices(self) -> Tensor:
        """[S] row of each sequence's last new token: the rows whose logits sample the next token."""
        return self.query_start_loc[1:] - 1


@dataclass
class _Plan:
    """Step-constant indices and masks (see `_build_plan`); the parts a path needs are built on its first use."""

    decode_rows: Tensor | None          # [Sd] rows of single-token sequences; None when every row is one
    decode_tables: Tensor | None        # [Sd, B] their block tables; None when no row decodes
    decode_lens: Tensor | None          # [Sd] their context lengths
    decode_lens_list: list[int]
    # PyTorch path: per prefill chunk (row start, row end, slots [L], mask [q, L] | None).
    prefills: list[tuple[int, int, Tensor, Tensor | None]] | None = None
    # PyTorch path: slots [Sd, Lmax] of the decode contexts (padded with slot 0), and the mask
    # [Sd, 1, 1, Lmax] (True = attend; None when every context is Lmax long).
    gather: tuple[Tensor, Tensor | None] | None = None
    # C kernel: int32 block tables [N, B], context lengths [N], sequence lengths [N], one per row (`kernel_args`).
    kernel_args: tuple[Tensor, Tensor, Tensor] | None = None


def _context_slots(block_tables: Tensor, block_size: int, length: int) -> Tensor:
    # block_tables: [S, B] -> slots: [S, length], the cache slot of every position < length.
    n_blocks = -(-length // block_size)
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = block_tables[:, :n_blocks, None] * block_size + offsets  # [S, n_blocks, block_size]
    # Contiguous, so every layer can flatten it for index_select without a copy.
    return slots.reshape(block_tables.shape[0], n_blocks * block_size)[:, :length].contiguous()


def _build_plan(meta: AttentionMetadata) -> _Plan:
    device = meta.block_tables.device
    decode = [s for s, q in enumerate(meta.query_lens) if q == 1]
    decode_rows = tables = seq_lens = None
    if decode and len(decode) == meta.num_seqs:  # decode-only: row s is sequence s, no index needed
        tables, seq_lens = meta.block_tables, meta.seq_lens
    elif decode:
        idx = torch.tensor(decode, dtype=torch.long, device=device)
        decode_rows = meta.query_start_loc.index_select(0, idx)  # a decode sequence's one row
        tables, seq_lens = meta.block_tables.index_select(0, idx), meta.seq_lens.index_select(0, idx)
    return _Plan(decode_rows, tables, seq_lens, [meta.seq_lens_list[s] for s in decode])


def _prefill_plan(meta: AttentionMetadata) -> list[tuple[int, int, Tensor, Tensor | None]]:
    plan = meta._plan
    if plan.prefills is None:
        device = meta.block_tables.device
        plan.prefills = []
        start = 0
        for s, (q_len, s_len) in enumerate(zip(meta.query_lens, meta.seq_lens_list)):
            if q_len > 1:
                slots = _context_slots(meta.block_tables[s:s + 1], meta.block_size, s_len)[0]
                cached = s_len - q_len
                mask = None  # nothing cached: plain causal, which SDPA does without a mask tensor
                if cached > 0:
                    # query i sits at position cached + i and sees keys j <= cached + i.
                    q_pos = torch.arange(cached, s_len, device=device)
                    mask = torch.arange(s_len, device=device)[None, :] <= q_pos[:, None]  # [q, L]
                plan.prefills.append((start, start + q_len, slots, mask))
            start += q_len
    return plan.prefills


def _decode_gather(plan: _Plan, block_size: int) -> tuple[Tensor, Tensor | None]:
    if plan.gather is None:
        l_max = max(plan.decode_lens_list)
        slots = _context_slots(plan.decode_tables, block_size, l_max)
        mask = None
        if min(plan.decode_lens_list) != l_max:
            keep = torch.arange(l_max, device=slots.device)[None, :] < plan.decode_lens[:, None]  # [Sd, Lmax]
            mask = keep[:, None, None, :]
        plan.gather = (slots, mask)
    return plan.gather


def kernel_args(meta: AttentionMetadata, k_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The C kernel's view of the step, one entry per ROW (int32, contiguous): block tables [N, B],
    context lengths [N] (the row's position + 1) and its sequence's length [N] (see the kernel's notes).

    A prefill row at position p is a one-query sequence of length p + 1 with its sequence's block
    table (the causal mask, in other words), so one kernel call covers every row of the step.
    Built once per step and checked against the cache, since the kernel reads where they point.
    """
    if meta._plan is None:
        meta._plan = _build_plan(meta)
    plan = meta._plan
    if plan.kernel_args is None:
        tables = meta.block_tables
        if all(q == 1 for q in meta.query_lens):
            lens = nkeys = meta.seq_lens_list
        else:
            seq_of_row = torch.repeat_interleave(torch.arange(meta.num_seqs, device=tables.device),
                                                 torch.tensor(meta.query_lens, device=tables.device))
            tables = tables.index_select(0, seq_of_row)
            lens, nkeys = [], []
            for q, s in zip(meta.query_lens, meta.seq_lens_list):
                lens += range(s - q + 1, s + 1)
                nkeys += [s] * q  # the reference runs every query of a sequence against all its keys
        _check_tables(tables, lens, k_cache.shape[0], meta.block_size)
        as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=tables.device)  # noqa: E731
        plan.kernel_args = (tables.to(torch.int32).contiguous(), as_int(lens), as_int(nkeys))
    return plan.kernel_args


def _check_tables(tables: Tensor, lens: list[int], num_blocks: int, block_size: int) -> None:
    width = tables.shape[1] * block_size
    if not lens or max(lens) > width or min(lens) < 1:
        raise ValueError(f"context lengths {min(lens, default=0)}..{max(lens, default=0)} need 1..{width} "
                         f"positions (block tables of {tables.shape[1]} blocks of {block_size})")
    used = tables[:, :-(-max(lens) // block_size)]  # padding past a context is never read
    if min(lens) != max(lens):
        need = (torch.tensor(lens, device=tables.device) + block_size - 1) // block_size
        used = used[torch.arange(used.shape[1], device=used.device)[None, :] < need[:, None]]
    if used.numel():
        lo, hi = (int(v) for v in torch.aminmax(used))
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block tables hold ids outside the cache's {num_blocks} blocks ({lo}..{hi})")


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor | QuantizedKV, v_cache: Tensor | QuantizedKV,
             slot_mapping: Tensor) -> None:
    """Store the new tokens' keys and values: k, v [N, KVH, D] into slots `slot_mapping` [N] of the caches.

    Int8 caches (`QuantizedKV`) quantize on the way in, raising their block scales as needed.
    """
    if is_quantized(k_cache) != is_quantized(v_cache):
        raise ValueError("k_cache and v_cache must both be int8 QuantizedKV or both plain tensors")
    if is_quantized(k_cache):
        plan = write_plan(slot_mapping, k_cache.shape[1])  # one grouping for K and V
        quantize_write(k, k_cache, slot_mapping, plan)
        quantize_write(v, v_cache, slot_mapping, plan)
        return
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def paged_attention(q: Tensor, k_cache: Tensor | QuantizedKV, v_cache: Tensor | QuantizedKV,
                    meta: AttentionMetadata, scale: float) -> Tensor:
    """Causal attention of the step's queries over their sequences' cached context.

    q: [N, H, D]; caches: [num_blocks, block_size, KVH, D] with this step's K/V already written
    (`write_kv`); H must be a multiple of KVH (query head h reads KV head h // (H // KVH)).
    Returns [N, H, D]. On CUDA, with caches in q's dtype, the Triton kernels run (`paged_attention_triton`;
    SLIMLM_TRITON=0 turns them off). On CPU all rows go through slimlm's C kernel where it can run
    (`attention_kernel_for`), each as one query over its causal context; otherwise decode rows are gathered into one
    `scaled_dot_product_attention` call and each prefill chunk into another (int8 caches dequantized
    to q's dtype as they are gathered).
    """
    if q.is_cuda and not is_quantized(k_cache) and k_cache.dtype == q.dtype and use_triton(q.device):
        from ..kernels.paged_attention_triton import triton_paged_attention

        return triton_paged_attention(q, k_cache, v_cache, meta, scale)
    if meta._plan is None:
        meta._plan = _build_plan(meta)
    plan = meta._plan
    n, h, d = q.shape
    kvh = k_cache.shape[-2]
    group = h // kvh

    if n and (kernel := attention_kernel_for(q, k_cache, v_cache)) is not None:
        tables, lens, nkeys = kernel_args(meta, k_cache)  # every row, prefill rows included
        out = q.new_empty(n, h, d)
        rest = (tables.data_ptr(), tables.shape[1], lens.data_ptr(), nkeys.data_ptr(), out.data_ptr(), n, h, kvh, d,
                meta.block_size, scale, torch.get_num_threads())
        if is_quantized(k_cache):
            kernel(q.data_ptr(), q.stride(0), k_cache.data.data_ptr(), v_cache.data.data_ptr(),
                   k_cache.scale.data_ptr(), v_cache.scale.data_ptr(), *rest, int(q.dtype == torch.bfloat16))
        else:
            kernel(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), *rest)
        return out

    out = None
    if plan.decode_tables is not None:
        slots, mask = _decode_gather(plan, meta.block_size)
        s_d, l_max = slots.shape
        q_d = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        # A decode query sees its whole context, so the G query heads sharing a KV head can ride
        # as G "query positions" of that head: GQA with no repeated K/V and no causal mask.
        q_d = q_d.reshape(s_d, kvh, group, d)                                    # [Sd, KVH, G, D]
        k = gather_slots(k_cache, slots.view(-1), q.dtype).view(s_d, l_max, kvh, d)  # [Sd, L, KVH, D]
        v = gather_slots(v_cache, slots.view(-1), q.dtype).view(s_d, l_max, kvh, d)
        decode_out = F.scaled_dot_product_attention(
            q_d, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
        decode_out = decode_out.reshape(s_d, h, d)  # [Sd, H, D]; reshape: kernels differ in output layout
        if plan.decode_rows is None:
            return decode_out
        out = q.new_empty(n, h, d)
        out.index_copy_(0, plan.decode_rows, decode_out)

    if out is None:
        out = q.new_empty(n, h, d)
    for start, end, slots, mask in _prefill_plan(meta):
        q_s = q[start:end].transpose(0, 1)                                   # [H, q, D]
        k = gather_slots(k_cache, slots, q.dtype).transpose(0, 1)            # [KVH, L, D]
        v = gather_slots(v_cache, slots, q.dtype).transpose(0, 1)
        o = F.scaled_dot_product_attention(q_s, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=group > 1)  # [H, q, D]
        out[start:end] = o.transpose(0, 1)
    return out


def reference_paged_attention(q: Tensor, k_cache: Tensor | QuantizedKV, v_cache: Tensor | QuantizedKV,
                              meta: AttentionMetadata, scale: float) -> Tensor:
    """The same contract as `paged_attention`, one sequence and one query at a time, in float64."""
    if is_quantized(k_cache):
        k_cache, v_cache = k_cache.dequantize(torch.float64), v_cache.dequantize(torch.float64)
    n, h, d = q.shape
    kvh = k_cache.shape[-2]
    group = h // kvh
    out = torch.zeros(n, h, d, dtype=torch.float64)
    start = 0
    for s, q_len in enumerate(meta.query_lens):
        s_len = meta.seq_lens_list[s]
        table = meta.block_tables[s].tolist()
        blocks = [table[p // meta.block_size] for p in range(s_len)]
        offsets = [p % meta.block_size for p in range(s_len)]
        k = k_cache[blocks, offsets].double()  # [L, KVH, D]
        v = v_cache[blocks, offsets].double()
        for i in range(q_len):
            pos = s_len - q_len + i
            for head in range(h):
                kv = head // group
                scores = (k[:pos + 1, kv] @ q[start + i, head].double()) * scale  # [pos + 1]
                out[start + i, head] = torch.softmax(scores, dim=0) @ v[:pos + 1, kv]
        start += q_len
    return out.to(q.dtype)


# ---- the C kernel ----------------------------------------------------------------------------------
# Why: PyTorch's path gathers every context's K and V into new tensors and runs SDPA's flash kernel,
# which at decode has one query row per head: ~40 us per layer at batch 1, ~0.7 ms at 32 sequences
# of 200 tokens (2-core CI machine, one thread, SmolLM2 shapes, cache out of the CPU caches). This
# kernel reads the cache in place through the block tables, one query row at a time (a prefill
# row is a query whose context ends at its own position): ~20 us and ~0.3 ms; a 128-token prefill
# spends 8 ms in attention instead of 29. Checked against `reference_paged_attention` in the tests.

KERNEL_MAX_HEADS = 1024
KERNEL_MAX_HEAD_DIM = 256


def attention_kernel_for(q: Tensor, k_cache: Tensor | QuantizedKV, v_cache: Tensor | QuantizedKV):
    """The C attention function for these tensors, or None where it cannot run them.

    It runs CPU tensors: q in bfloat16 or float32, both caches in q's dtype or both int8 `QuantizedKV`
    (read in place with their per-block scales: `slimlm_decode_attention_kv8`); caches contiguous;
    each query row's [H, D] contiguous; head_dim a multiple of 16 up to 256, up to 1024 query heads,
    where the library builds (see `serve.kernels.cpu_build.build_cpu_kernels`) and SLIMLM_CPU_KERNELS
    is not 0.
    """
    quantized = is_quantized(k_cache) and is_quantized(v_cache)
    if quantized:
        k_data, v_data = k_cache.data, v_cache.data
        same = (k_data.dtype == v_data.dtype == torch.int8 and k_cache.scale.dtype == v_cache.scale.dtype == torch.float32
                and k_cache.scale.is_contiguous() and v_cache.scale.is_contiguous())
    elif isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor):
        k_data, v_data = k_cache, v_cache
        same = k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    else:
        return None
    h, d = q.shape[-2:]
    kvh = k_data.shape[-2]
    if not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and same
            and k_data.device.type == "cpu" and k_data.is_contiguous() and v_data.is_contiguous()
            and q.stride(-1) == 1 and q.stride(-2) == d and d % 16 == 0 and d <= KERNEL_MAX_HEAD_DIM
            and h % kvh == 0 and h <= KERNEL_MAX_HEADS and kernels_enabled()):
        return None
    lib = _decode_library()
    if lib is None:
        return None
    if quantized:
        return lib.slimlm_decode_attention_kv8
    return lib.slimlm_decode_attention_bf16 if q.dtype == torch.bfloat16 else lib.slimlm_decode_attention_f32


@functools.cache
def _decode_library():
    lib = build_cpu_kernels("attention")
    if lib is None:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    for name in ("slimlm_decode_attention_bf16", "slimlm_decode_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i, p, p, p, i, p, p, p, i, i, i, i, i, ctypes.c_float, i]
        fn.restype = None
    lib.slimlm_decode_attention_kv8.argtypes = [p, i, p, p, p, p, p, i, p, p, p, i, i, i, i, i, ctypes.c_float, i, i]
    lib.slimlm_decode_attention_kv8.restype = None
    return lib


