"""Attention over a paged KV cache, for one engine step over a flattened batch.

An engine step runs N new tokens that belong to S sequences, laid end to end (no padding):
some sequences are decoding (one new token), others are prefilling a chunk of their prompt.
Each layer's cache is a pair of tensors `[num_blocks, block_size, KVH, D]`; a sequence owns a
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

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """Step-constant gather indices and masks (see `_build_plan`)."""

    decode_rows: Tensor | None          # [Sd] rows of single-token sequences; None when every row is one
    decode_slots: Tensor | None         # [Sd, Lmax] cache slots of their contexts (padded with slot 0)
    decode_mask: Tensor | None          # [Sd, 1, 1, Lmax] True = attend; None when all contexts are Lmax long
    prefills: list[tuple[int, int, Tensor, Tensor | None]]  # (row start, row end, slots [L], mask [q, L] | None)


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
    decode_rows = decode_slots = decode_mask = None
    if decode:
        lens = [meta.seq_lens_list[s] for s in decode]
        l_max = max(lens)
        if len(decode) == meta.num_seqs:  # decode-only: row s is sequence s, no index needed
            tables, seq_lens = meta.block_tables, meta.seq_lens
        else:
            idx = torch.tensor(decode, dtype=torch.long, device=device)
            decode_rows = meta.query_start_loc.index_select(0, idx)  # a decode sequence's one row
            tables, seq_lens = meta.block_tables.index_select(0, idx), meta.seq_lens.index_select(0, idx)
        decode_slots = _context_slots(tables, meta.block_size, l_max)
        if min(lens) != l_max:
            keep = torch.arange(l_max, device=device)[None, :] < seq_lens[:, None]  # [Sd, Lmax]
            decode_mask = keep[:, None, None, :]
    prefills = []
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
            prefills.append((start, start + q_len, slots, mask))
        start += q_len
    return _Plan(decode_rows, decode_slots, decode_mask, prefills)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store the new tokens' keys and values: k, v [N, KVH, D] into slots `slot_mapping` [N] of the caches."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float) -> Tensor:
    """Causal attention of the step's queries over their sequences' cached context.

    q: [N, H, D]; caches: [num_blocks, block_size, KVH, D] with this step's K/V already written
    (`write_kv`); H must be a multiple of KVH (query head h reads KV head h // (H // KVH)).
    Returns [N, H, D].
    """
    if meta._plan is None:
        meta._plan = _build_plan(meta)
    plan = meta._plan
    n, h, d = q.shape
    kvh = k_cache.shape[-2]
    group = h // kvh
    k_flat = k_cache.view(-1, kvh, d)  # [num_slots, KVH, D]
    v_flat = v_cache.view(-1, kvh, d)

    decode_out = None
    if plan.decode_slots is not None:
        s_d, l_max = plan.decode_slots.shape
        q_d = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        # A decode query sees its whole context, so the G query heads sharing a KV head can ride
        # as G "query positions" of that head: GQA with no repeated K/V and no causal mask.
        q_d = q_d.reshape(s_d, kvh, group, d)                                           # [Sd, KVH, G, D]
        k = k_flat.index_select(0, plan.decode_slots.view(-1)).view(s_d, l_max, kvh, d)  # [Sd, L, KVH, D]
        v = v_flat.index_select(0, plan.decode_slots.view(-1)).view(s_d, l_max, kvh, d)
        decode_out = F.scaled_dot_product_attention(
            q_d, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.decode_mask, scale=scale)
        decode_out = decode_out.reshape(s_d, h, d)  # [Sd, H, D]; reshape: kernels differ in output layout
        if plan.decode_rows is None:
            return decode_out

    out = q.new_empty(n, h, d)
    if decode_out is not None:
        out.index_copy_(0, plan.decode_rows, decode_out)
    for start, end, slots, mask in plan.prefills:
        q_s = q[start:end].transpose(0, 1)                                   # [H, q, D]
        k = k_flat.index_select(0, slots).transpose(0, 1)                    # [KVH, L, D]
        v = v_flat.index_select(0, slots).transpose(0, 1)
        o = F.scaled_dot_product_attention(q_s, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=group > 1)  # [H, q, D]
        out[start:end] = o.transpose(0, 1)
    return out


def reference_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                              scale: float) -> Tensor:
    """The same contract as `paged_attention`, one sequence and one query at a time, in float64."""
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
