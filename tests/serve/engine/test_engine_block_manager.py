"""BlockManager: refcounts and free list, prefix reuse, LRU eviction, fork + copy-on-write, rollback."""
import pytest

from slimlm.serve.engine import BlockManager, Sequence

SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks of 4


def compute(bm, seq, n):
    """What one model step does to a sequence: allocate, write KV, name the blocks that filled up."""
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence(0, list(range(10)), max_tokens=4)
    assert bm.can_allocate(seq, 10)
    compute(bm, seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert (bm.num_free_blocks, bm.num_used_blocks) == (5, 3)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    bm.check_consistency([seq])
    seq.append_token(99)
    compute(bm, seq, 1)  # position 10 still fits block 2
    assert len(seq.block_table) == 3
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert (bm.num_free_blocks, bm.num_used_blocks) == (8, 0)
    bm.check_consistency([])


def test_out_of_blocks_is_refused_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence(0, list(range(9)), max_tokens=1)
    assert not bm.can_allocate(seq, 9) and bm.can_allocate(seq, 8)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_shared_system_prompt_second_sequence_computes_only_its_suffix():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = Sequence(0, SYSTEM + [1, 2, 3], max_tokens=4)
    compute(bm, first, first.num_tokens)
    second = Sequence(1, SYSTEM + [7, 7, 7, 7, 7], max_tokens=4)
    assert bm.lookup_prefix(second) == 8
    assert bm.can_allocate(second, 5)
    bm.allocate(second, 5)  # 5 = the suffix: the cached prefix is taken first
    assert second.num_computed_tokens == second.num_cached_prefix_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] not in first.block_table and len(second.block_table) == 4
    assert [bm.ref_count(b) for b in first.block_table] == [2, 2, 1]
    assert (bm.hits, bm.queries) == (8, 11 + 13)
    assert bm.hit_rate == pytest.approx(8 / 24)
    bm.check_consistency([first, second])


def test_prefix_match_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=4)
    compute(bm, Sequence(0, SYSTEM + [1], max_tokens=1), 9)
    same = Sequence(1, SYSTEM, max_tokens=1)  # both blocks cached, but the last token needs logits
    assert bm.lookup_prefix(same) == 4
    bm.allocate(same, 4)
    assert same.num_computed_tokens == 4 and same.num_tokens - same.num_computed_tokens == 4


def test_freed_blocks_stay_cached_and_are_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    old = Sequence(0, SYSTEM + [1], max_tokens=1)
    compute(bm, old, 9)
    system_blocks = old.block_table[:2]
    bm.free(old)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    new = Sequence(1, SYSTEM + [2, 3], max_tokens=1)
    bm.allocate(new, 2)
    assert new.block_table[:2] == system_blocks and bm.num_free_blocks == 1
    bm.check_consistency([new])


def test_cached_blocks_in_the_free_pool_count_as_taken_when_judging_room():
    bm = BlockManager(num_blocks=3, block_size=4)
    old = Sequence(0, SYSTEM + [1], max_tokens=1)
    compute(bm, old, 9)
    bm.free(old)  # 3 free blocks, 2 of them hold SYSTEM
    new = Sequence(1, SYSTEM + [2, 3, 4, 5, 6], max_tokens=1)
    assert bm.lookup_prefix(new) == 8
    assert bm.can_allocate(new, 4)  # positions 8..11: one more block
    assert not bm.can_allocate(new, 5)  # two more, but reusing SYSTEM takes 2 of the 3 free


def test_lru_evicts_least_recently_freed_tail_first_and_prefers_plain_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = Sequence(0, [1, 2, 3, 4, 9], max_tokens=1)
    b = Sequence(1, [5, 6, 7, 8, 9], max_tokens=1)
    compute(bm, a, 5)
    compute(bm, b, 5)
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    fillers = [Sequence(10 + i, [0], max_tokens=1) for i in range(4)]  # 1 token: never named
    for filler in fillers[:2]:
        compute(bm, filler, 1)  # the two plain free blocks go first: nothing is evicted
    assert bm.num_cached_blocks == 4
    compute(bm, fillers[2], 1)  # evicts a's tail block (a was freed first, tail first)
    assert bm.num_cached_blocks == 3
    assert bm.lookup_prefix(Sequence(4, [1, 2, 3, 4, 9], max_tokens=1)) == 2
    compute(bm, fillers[3], 1)  # then a's head block
    assert bm.lookup_prefix(Sequence(4, [1, 2, 3, 4, 9], max_tokens=1)) == 0
    assert bm.lookup_prefix(Sequence(5, [5, 6, 7, 8, 9], max_tokens=1)) == 4
    bm.check_consistency(fillers)


def test_reusing_a_cached_block_makes_it_recently_used():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = Sequence(0, [1, 2, 9], max_tokens=1)
    b = Sequence(1, [3, 4, 9], max_tokens=1)
    compute(bm, a, 2)
    bm.free(a)
    compute(bm, b, 2)
    bm.free(b)  # LRU order: a's block, b's block
    again = Sequence(2, [1, 2, 5], max_tokens=1)
    compute(bm, again, 1)  # takes a's block back from the pool
    bm.free(again)  # ... and returns it as the most recently used
    compute(bm, Sequence(3, [7, 7, 7], max_tokens=1), 3)  # one plain block + one eviction
    assert bm.lookup_prefix(Sequence(4, [1, 2, 0], max_tokens=1)) == 2
    assert bm.lookup_prefix(Sequence(5, [3, 4, 0], max_tokens=1)) == 0


def test_fork_shares_blocks_and_the_first_writer_copies_the_shared_last_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    parent = Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=4)
    compute(bm, parent, 6)  # block 0 full, block 1 holds 2 of 4 tokens
    child = parent.clone(1)
    bm.fork(parent, child)
    full, partial = parent.block_table
    assert child.block_table == [full, partial] and child.num_computed_tokens == 6
    assert bm.ref_count(full) == bm.ref_count(partial) == 2 and bm.num_used_blocks == 2
    child.append_token(7)
    compute(bm, child, 1)  # writes position 6 into the shared block -> private copy first
    copy = child.block_table[1]
    assert copy != partial and child.block_table[0] == full
    assert bm.pop_copy_ops() == [(partial, copy)] and bm.pop_copy_ops() == []
    assert bm.ref_count(partial) == 1 and bm.ref_count(full) == 2
    parent.append_token(8)
    compute(bm, parent, 1)  # now the only owner: writes in place, no copy
    assert parent.block_table == [full, partial] and bm.pop_copy_ops() == []
    bm.check_consistency([parent, child])
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 4
    bm.check_consistency([])


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(num_blocks=2, block_size=4)
    parent = Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=4)
    compute(bm, parent, 6)
    child = parent.clone(1)
    bm.fork(parent, child)
    child.append_token(7)
    assert bm.num_free_blocks == 0 and not bm.can_allocate(child, 1)


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    parent = Sequence(0, SYSTEM, max_tokens=4)
    compute(bm, parent, 8)
    child = parent.clone(1)
    bm.fork(parent, child)
    child.append_token(1)
    compute(bm, child, 1)
    assert bm.pop_copy_ops() == [] and child.block_table[:2] == parent.block_table


def test_fork_refuses_a_child_with_other_tokens():
    bm = BlockManager(num_blocks=4, block_size=4)
    parent = Sequence(0, [1, 2, 3], max_tokens=4)
    compute(bm, parent, 3)
    with pytest.raises(ValueError, match="does not start with"):
        bm.fork(parent, Sequence(1, [1, 2, 4], max_tokens=4))


def test_rollback_frees_emptied_blocks_and_unnames_the_partial_one():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence(0, [1, 2, 3, 4], max_tokens=16)
    compute(bm, seq, 4)
    for t in range(5, 12):  # decode 7 tokens, as if accepted drafts
        seq.append_token(t)
        compute(bm, seq, 1)
    seq.append_token(12)  # 12 tokens, 11 computed, 3 blocks; blocks 0 and 1 are named
    assert bm.num_cached_blocks == 2 and len(seq.block_table) == 3
    b0, b1, b2 = seq.block_table
    bm.rollback(seq, 6)  # keep 6 tokens: block 1 half full, block 2 empty
    assert seq.token_ids == [1, 2, 3, 4, 5, 6] and seq.num_computed_tokens == 6
    assert seq.block_table == [b0, b1] and bm.ref_count(b2) == 0
    assert bm.num_cached_blocks == 1  # b1 will be overwritten, so it no longer names [5..8]
    assert bm.lookup_prefix(Sequence(1, [1, 2, 3, 4, 5, 6, 7, 8, 0], max_tokens=1)) == 4
    bm.check_consistency([seq])
    seq.append_token(70)
    compute(bm, seq, 1)
    assert seq.block_table == [b0, b1] and bm.pop_copy_ops() == []
    with pytest.raises(ValueError, match="prompt cannot be dropped"):
        bm.rollback(seq, 4)
    bm.free(seq)
    assert bm.num_free_blocks == 8
    bm.check_consistency([])


def test_rollback_into_a_shared_block_keeps_its_name_and_copies_on_the_next_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(0, [1, 2, 3], max_tokens=8)
    compute(bm, a, 3)
    for t in (4, 5, 6):
        a.append_token(t)
        compute(bm, a, 1)  # 6 tokens computed: block 0 = [1, 2, 3, 4] is full and named
    b = Sequence(1, [1, 2, 3, 4, 9], max_tokens=8)
    bm.allocate(b, 1)  # shares a's block 0
    b.num_computed_tokens += 1
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.ref_count(shared) == 2
    bm.rollback(a, 3)  # a keeps [1, 2, 3]: block 0 is partial for a, still full for b
    assert a.block_table == [shared] and bm.lookup_prefix(Sequence(2, [1, 2, 3, 4, 0], max_tokens=1)) == 4
    a.append_token(40)
    compute(bm, a, 1)  # writes position 3 of the shared block -> copy first
    assert a.block_table[0] != shared and bm.pop_copy_ops() == [(shared, a.block_table[0])]
    bm.check_consistency([a, b])


def test_a_named_block_left_to_one_owner_loses_its_name_before_it_is_overwritten():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(0, [1, 2, 3], max_tokens=8)
    compute(bm, a, 3)
    for t in (4, 5):
        a.append_token(t)
        compute(bm, a, 1)  # block 0 = [1, 2, 3, 4], named
    b = Sequence(1, [1, 2, 3, 4, 9], max_tokens=8)
    bm.allocate(b, 1)
    a.append_token(6)
    bm.rollback(a, 3)  # a keeps [1, 2, 3]; block 0 is shared, so it keeps its name
    bm.free(b)  # now a owns it alone, still named [1, 2, 3, 4]
    assert bm.lookup_prefix(Sequence(2, [1, 2, 3, 4, 0], max_tokens=1)) == 4
    a.append_token(40)
    compute(bm, a, 1)  # overwrites position 3 in place: the old name must go
    assert bm.pop_copy_ops() == []
    assert bm.lookup_prefix(Sequence(3, [1, 2, 3, 4, 0], max_tokens=1)) == 0
    assert bm.lookup_prefix(Sequence(4, [1, 2, 3, 40, 0], max_tokens=1)) == 4
    bm.check_consistency([a])


def test_duplicate_full_blocks_stay_private_and_leak_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Sequence(0, SYSTEM + [1], max_tokens=1), Sequence(1, SYSTEM + [1], max_tokens=1)
    bm.allocate(a, 9)
    bm.allocate(b, 9)  # side by side: no hit yet
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.register_full_blocks(s)
    assert bm.num_cached_blocks == 2 and len(b.block_hashes) == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_consistency([])


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute(bm, Sequence(0, SYSTEM + [1], max_tokens=1), 9)
    other = Sequence(1, SYSTEM + [2], max_tokens=1)
    assert bm.lookup_prefix(other) == 0 and bm.num_cached_blocks == 0
    bm.allocate(other, 9)
    assert other.num_computed_tokens == 0 and (bm.hits, bm.queries) == (0, 0)


def test_reset_prefix_cache_forgets_unused_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Sequence(0, SYSTEM + [1], max_tokens=1), Sequence(1, [5, 5, 5, 5, 5], max_tokens=1)
    compute(bm, a, 9)
    compute(bm, b, 5)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 6
    bm.check_consistency([b])


def test_double_free_and_leaks_are_caught():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence(0, [1, 2, 3], max_tokens=1)
    compute(bm, seq, 3)
    alias = Sequence(1, [1, 2, 3], max_tokens=1)
    alias.block_table = list(seq.block_table)  # a reference the manager never handed out
    with pytest.raises(AssertionError, match="refcount 1, referenced 2"):
        bm.check_consistency([seq, alias])
    with pytest.raises(AssertionError, match="refcount 1, referenced 0"):
        bm.check_consistency([])  # seq dropped without free(): a leak
    bm.free(seq)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(alias)
