"""Paged KV cache bookkeeping: which physical block holds which tokens, shared how often.

The KV cache is `num_blocks` fixed-size blocks of `block_size` token slots. A sequence's
`block_table[i]` holds its tokens `[i * block_size, (i + 1) * block_size)`, so the slot of position
`pos` is `block_table[pos // block_size] * block_size + pos % block_size`. Only ids move here; the
tensors live in the model runner, which must execute `pop_copy_ops()` before writing a step's KV.

Three ways a block gets shared, one rule that keeps sharing safe:
- prefix caching: a FULL block is named by a hash chained over (previous block's hash, its token
  ids), so equal prefixes map to equal names and a new sequence reuses the blocks of an old one;
- fork (n > 1 sampling): a child shares every block of its parent;
- a freed full block keeps its name and stays reusable (refcount 0, in an LRU pool) until a fresh
  block is needed and it is evicted.
The rule: a sequence never writes into a block that someone else can read. Before a write, a
shared block is replaced by a private copy (copy-on-write, reported as a copy op) and a named block
owned alone loses its name (its cached content is about to change).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable

from .sequence import Sequence

_ROOT = bytes(32)  # the "previous hash" of a sequence's first block


def _chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    # sha256 rather than hash(): a 64-bit collision would silently serve another prompt's KV, and
    # colliding Python hashes of int tuples can be constructed on purpose by a client.
    h = hashlib.sha256(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates KV blocks to sequences with refcounts, a free list and an LRU prefix cache.

    Free blocks are either plain (`_free`, no content worth keeping) or cached (`_evictable`: refcount
    0 but still named, oldest first). Fresh blocks come from the plain list first, so a cached prefix
    is only sacrificed when memory is really short. Stats `hits`/`queries` count prompt tokens.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._copy_ops: list[tuple[int, int]] = []
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # tokens of the sequences that looked the cache up

    # -- stats ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take (plain free ones plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a prefix-cache name, in use or not."""
        return len(self._hash_to_block)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    # -- block primitives ----------------------------------------------------------------------
    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)  # least recently freed
            self._unname(block)
        else:
            raise RuntimeError("out of KV blocks; ask can_allocate() before allocate()")
        self._ref[block] = 1
        return block

    def _unname(self, block: int) -> None:
        name = self._hash[block]
        if name is not None:
            del self._hash_to_block[name]
            self._hash[block] = None

    def _incref(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]  # only named blocks are found while free
        self._ref[block] += 1

    def _decref(self, block: int) -> None:
        if self._ref[block] <= 0:
            raise RuntimeError(f"block {block} freed more often than allocated (double free)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._hash[block] is not None:
                self._evictable[block] = None  # most recently freed: evicted last
            else:
                self._free.append(block)

    # -- prefix cache --------------------------------------------------------------------------
    def _lookup(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """Cached blocks for the longest full-block prefix of seq, leaving >= 1 token to compute."""
        if (not self.enable_prefix_caching or seq.block_table or seq.num_computed_tokens
                or seq.skip_prefix_cache):
            return [], []
        bs = self.block_size
        blocks, names, parent = [], [], _ROOT
        # (num_tokens - 1) // bs: the last token is always computed, so the step has logits.
        for i in range((seq.num_tokens - 1) // bs):
            parent = _chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
            names.append(parent)
        return blocks, names

    def lookup_prefix(self, seq: Sequence) -> int:
        """Tokens the next `allocate` of this block-less sequence will take from the cache (no side effects)."""
        return len(self._lookup(seq)[0]) * self.block_size

    def _match_prefix(self, seq: Sequence) -> int:
        blocks, names = self._lookup(seq)
        for block in blocks:
            self._incref(block)
        seq.block_table = blocks
        seq.block_hashes = names
        seq.num_computed_tokens = len(blocks) * self.block_size
        if seq.num_cached_prefix_tokens is None:
            seq.num_cached_prefix_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        if self.enable_prefix_caching:
            self.queries += seq.num_tokens
            self.hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks whose slots are all computed, so later prompts can reuse them.

        Call after advancing `num_computed_tokens`. A block whose name is already taken (two equal
        prompts prefilled side by side) stays unnamed; its hash is still kept to continue the chain.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens, len(seq.block_table) * bs) // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT
        for i in range(len(seq.block_hashes), full):
            parent = _chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(parent)
            block = seq.block_table[i]
            if self._hash[block] is None and parent not in self._hash_to_block:
                self._hash[block] = parent
                self._hash_to_block[parent] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody uses (for cold-cache benchmarks)."""
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._unname(block)
            self._free.append(block)

    # -- allocation ----------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        if num_new_tokens <= 0:
            return 0
        table, bs = seq.block_table, self.block_size
        target = _ceil_div(seq.num_computed_tokens + num_new_tokens, bs)
        written = range(seq.num_computed_tokens // bs, min(len(table), target))
        copies = sum(1 for i in written if self._ref[table[i]] > 1)
        return copies + max(0, target - len(table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would succeed now.

        For a sequence without blocks, `num_new_tokens` counts after the cached prefix that
        `allocate` will reuse (see `lookup_prefix`); cached blocks that sit free in the LRU pool are
        taken by that reuse, so they do not count as free for the rest.
        """
        blocks, _ = self._lookup(seq)
        if blocks:
            taken_from_pool = sum(1 for b in blocks if self._ref[b] == 0)
            need = _ceil_div(len(blocks) * self.block_size + num_new_tokens, self.block_size)
            return need - len(blocks) <= self.num_free_blocks - taken_from_pool
        return self._blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make `seq.block_table` hold `seq.num_computed_tokens + num_new_tokens` tokens, safely writable.

        A sequence without blocks first takes its cached prefix (raising `num_computed_tokens`; at its
        first admission, setting `num_cached_prefix_tokens`). Blocks in the range about to be written are made private: a
        shared one is replaced by a fresh block plus a (src, dst) copy op when it holds KV this
        sequence still reads; a named one owned alone is un-named. Raises RuntimeError when memory
        is short, leaving everything unchanged.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(f"not enough free KV blocks for {num_new_tokens} more tokens of "
                               f"sequence {seq.seq_id} ({self.num_free_blocks} free)")
        if not seq.block_table and seq.num_computed_tokens == 0:
            self._match_prefix(seq)
        if num_new_tokens == 0:
            return
        table, bs, computed = seq.block_table, self.block_size, seq.num_computed_tokens
        target = _ceil_div(computed + num_new_tokens, bs)
        for i in range(computed // bs, min(len(table), target)):
            if i < len(seq.block_hashes):  # rewriting a block it had already offered to the cache
                del seq.block_hashes[i:]
            block = table[i]
            if self._ref[block] > 1:
                fresh = self._take_fresh()
                if i * bs < computed:  # it holds KV this sequence keeps reading
                    self._copy_ops.append((block, fresh))
                self._decref(block)
                table[i] = fresh
            elif self._hash[block] is not None:
                self._unname(block)
        while len(table) < target:
            table.append(self._take_fresh())

    def pop_copy_ops(self) -> list[tuple[int, int]]:
        """(src_block, dst_block) copies the runner must do, for every layer's K and V, before it
        writes any KV of the step; returns each op once."""
        ops, self._copy_ops = self._copy_ops, []
        return ops

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks (finish, abort, or preemption by recompute).

        The table is released back to front so a sequence's tail blocks, the least likely to be
        shared by a future prompt, are the first evicted from the prefix cache.
        """
        for block in reversed(seq.block_table):
            self._decref(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share all of `parent`'s blocks; the first to write a shared block copies it."""
        if child.block_table:
            raise ValueError(f"fork: child sequence {child.seq_id} already holds blocks")
        n = parent.num_computed_tokens
        if child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(f"fork: sequence {child.seq_id} does not start with the "
                             f"{n} computed tokens of sequence {parent.seq_id}")
        for block in parent.block_table:
            self._incref(block)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = n
        child.num_cached_prefix_tokens = parent.num_cached_prefix_tokens

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Drop the last `num_tokens` output tokens (rejected draft tokens) and the KV behind them.

        Blocks left empty are freed (a full one keeps its name: its KV is still right for its own
        prefix). A block left partly filled is written again later, so if seq owns it alone it
        loses its name now; if it is shared, the others still see it full and the later write
        copies it first.
        """
        seq.drop_last_tokens(num_tokens)
        bs = self.block_size
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        keep = _ceil_div(seq.num_computed_tokens, bs)
        while len(seq.block_table) > keep:
            self._decref(seq.block_table.pop())
        del seq.block_hashes[seq.num_computed_tokens // bs:]
        if seq.num_computed_tokens % bs and seq.block_table:
            last = seq.block_table[-1]
            if self._ref[last] == 1:
                self._unname(last)

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past those `seq.num_tokens` tokens need: look-ahead slots reserved for draft
        tokens that were rejected. Their KV lies beyond `num_computed_tokens` and was never named."""
        keep = _ceil_div(seq.num_tokens, self.block_size)
        while len(seq.block_table) > keep:
            self._decref(seq.block_table.pop())

    # -- debugging -----------------------------------------------------------------------------
    def check_consistency(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless refcounts equal the references in `seqs`' block tables and
        every block is in exactly one place (used, plain free, or cached free). Pass every live
        sequence; meant for tests and debugging, it walks all blocks."""
        errors, refs = [], [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_table:
                refs[block] += 1
            if len(seq.block_table) * self.block_size < seq.num_computed_tokens:
                errors.append(f"sequence {seq.seq_id}: {seq.num_computed_tokens} computed tokens "
                              f"but only {len(seq.block_table)} blocks")
            if len(seq.block_hashes) > seq.num_computed_tokens // self.block_size:
                errors.append(f"sequence {seq.seq_id}: hashes for {len(seq.block_hashes)} blocks, "
                              f"but only {seq.num_computed_tokens} tokens computed")
        for block in range(self.num_blocks):
            if refs[block] != self._ref[block]:
                errors.append(f"block {block}: refcount {self._ref[block]}, referenced {refs[block]} "
                              "times")
        free = list(self._free)
        if len(set(free)) != len(free) or set(free) & set(self._evictable):
            errors.append("a block is listed twice in the free pools")
        for block in free:
            if self._ref[block] or self._hash[block] is not None:
                errors.append(f"block {block} is plain-free but used or named")
        for block in self._evictable:
            if self._ref[block] or self._hash[block] is None:
                errors.append(f"block {block} is cached-free but used or unnamed")
        if self.num_free_blocks != self._ref.count(0):
            errors.append(f"{self.num_free_blocks} blocks listed free, {self._ref.count(0)} have "
                          "refcount 0")
        for name, block in self._hash_to_block.items():
            if self._hash[block] != name:
                errors.append(f"hash table points to block {block}, which has another name")
        if sum(h is not None for h in self._hash) != len(self._hash_to_block):
            errors.append("a named block is missing from the hash table")
        if errors:
            raise AssertionError("; ".join(errors))
