"""Scheduler with a fake model: continuous batching, budgets, chunked prefill, preemption, finishing.

The fake runner (conftest.py) checks the KV every step, and its "greedy" token depends only on the
tokens so far, so any correct schedule must give the same outputs as running each sequence alone.
"""
import pytest

from slimlm.serve.engine import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus

SYSTEM = list(range(100, 112))  # a shared 12-token system prompt
VOCAB = 50


def greedy(tokens):
    return hash(tuple(tokens)) % VOCAB  # the same rule as conftest.prefix_token


def solo(seq, max_model_len):
    """Reference outputs: the sequence decoded alone, no batching, no cache."""
    tokens = list(seq.prompt_token_ids)
    for _ in range(seq.max_tokens):
        tokens.append(greedy(tokens))
        if tokens[-1] in seq.eos_token_ids or len(tokens) >= max_model_len:
            break
    return tokens[seq.num_prompt_tokens:]


def make(num_blocks=64, block_size=4, prefix=True, **cfg):
    cfg = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 64} | cfg
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def step(sched, runner):
    out = sched.schedule()
    return out, sched.update(out, runner.step(out))


def workload(n=12):
    seqs = []
    for i in range(n):
        base = SYSTEM if i % 3 else []
        prompt = base + [(i * 7 + j) % VOCAB for j in range(1 + (i * 5) % 13)]
        seqs.append(Sequence(i, prompt, max_tokens=2 + (i * 3) % 9,
                             eos_token_ids=frozenset({0}) if i % 2 else frozenset()))
    return seqs


def test_a_new_sequence_joins_while_others_decode(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm)
    a, b = Sequence(0, [1, 2, 3, 4, 5], max_tokens=6), Sequence(1, [6, 7, 8, 9, 10], max_tokens=6)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched, runner)
    assert [(s.seq.seq_id, s.num_tokens, s.sample) for s in out.scheduled] == [(0, 5, True), (1, 5, True)]
    out, _ = step(sched, runner)
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [(0, 1), (1, 1)]
    c = Sequence(2, [11, 12, 13, 14, 15, 16, 17], max_tokens=3)
    sched.add(c)
    out, _ = step(sched, runner)
    assert [(s.seq.seq_id, s.start, s.num_tokens) for s in out.scheduled] == [
        (0, 6, 1), (1, 6, 1), (2, 0, 7)]
    done = drive(sched, runner)
    assert set(done) == {0, 1, 2}
    for seq in (a, b, c):
        assert seq.output_token_ids == solo(seq, 64) and seq.finish_reason == "length"
        assert seq.num_output_tokens == seq.max_tokens
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("chunked", [True, False])
def test_budget_and_max_num_seqs_hold_every_step(fake_runner, drive, chunked):
    sched, bm = make(max_num_seqs=5, max_num_batched_tokens=32, max_model_len=32,
                     chunked_prefill=chunked)
    seqs = workload(15)
    for seq in seqs:
        sched.add(seq)

    def check(out):
        assert out.num_batched_tokens <= 32 and len(out.scheduled) <= 5 and sched.num_running <= 5
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        if not chunked:  # every prefill is whole
            assert all(s.sample for s in out.scheduled)
        bm.check_consistency(sched.unfinished())

    drive(sched, fake_runner(bm), on_step=check)
    assert all(s.output_token_ids == solo(s, 32) for s in seqs)


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end(fake_runner, drive):
    sched, bm = make(max_num_batched_tokens=16)
    runner = fake_runner(bm)
    seq = Sequence(0, list(range(50)), max_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(4):
        out, _ = step(sched, runner)
        chunks.append((out.scheduled[0].start, out.scheduled[0].num_tokens, out.scheduled[0].sample))
        assert seq.status is SequenceStatus.RUNNING
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 50
    drive(sched, runner)
    assert seq.output_token_ids == solo(seq, 64)


def test_chunked_prefill_mixes_with_decodes_under_the_budget(fake_runner, drive):
    sched, bm = make(max_num_batched_tokens=16)
    runner = fake_runner(bm)
    talker = Sequence(0, [1, 2, 3], max_tokens=10)
    sched.add(talker)
    step(sched, runner)
    long = Sequence(1, list(range(40)), max_tokens=1)
    sched.add(long)
    plans = [[(s.seq.seq_id, s.num_tokens) for s in step(sched, runner)[0].scheduled] for _ in range(3)]
    assert plans == [[(0, 1), (1, 15)], [(0, 1), (1, 15)], [(0, 1), (1, 10)]]
    drive(sched, runner)
    assert talker.output_token_ids == solo(talker, 64) and long.output_token_ids == solo(long, 64)


def test_an_older_prefill_never_starves_a_newer_decode(fake_runner, drive):
    sched, bm = make(max_num_batched_tokens=16)
    runner = fake_runner(bm)
    talker = Sequence(0, [1, 2, 3], max_tokens=10, arrival_time=1.0)
    sched.add(talker)
    step(sched, runner)
    long = Sequence(1, list(range(40)), max_tokens=1, arrival_time=0.0)  # arrived earlier
    sched.add(long)
    plans = [[(s.seq.seq_id, s.num_tokens) for s in step(sched, runner)[0].scheduled] for _ in range(3)]
    # from the 2nd step on, the older prefill goes first but leaves 1 token for the decode
    assert plans == [[(0, 1), (1, 15)], [(1, 15), (0, 1)], [(1, 10), (0, 1)]]
    drive(sched, runner)
    assert talker.output_token_ids == solo(talker, 64) and long.output_token_ids == solo(long, 64)


def test_without_chunking_a_prompt_waits_for_room_and_nobody_overtakes_it(fake_runner, drive):
    sched, bm = make(max_num_batched_tokens=16, max_model_len=16, chunked_prefill=False)
    runner = fake_runner(bm)
    talker = Sequence(0, [1, 2, 3], max_tokens=4)
    sched.add(talker)
    step(sched, runner)
    big, small = Sequence(1, list(range(16)), max_tokens=1), Sequence(2, [5], max_tokens=1)
    sched.add(big)
    sched.add(small)
    out, _ = step(sched, runner)  # 1 decode leaves 15 tokens: big does not fit, small must wait
    assert [s.seq.seq_id for s in out.scheduled] == [0] and sched.num_waiting == 2
    drive(sched, runner)
    assert big.output_token_ids == solo(big, 16) and small.output_token_ids == solo(small, 16)


def test_preemption_by_recompute_then_every_sequence_finishes_right(fake_runner, drive):
    # 6 blocks of 4 = 24 slots; three sequences that each grow to 16 tokens cannot all stay.
    sched, bm = make(num_blocks=6, max_model_len=24)
    seqs = [Sequence(i, [10 * i + j for j in range(4)], max_tokens=12) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    preempted = []

    def check(out):
        running = {s.seq.seq_id for s in out.scheduled}
        for victim in out.preempted:
            assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            assert victim.num_computed_tokens == 0
            # the most recently arrived running sequence goes, and to the front of the queue
            assert all(other < victim.seq_id for other in running)
            assert sched._waiting[0] is out.preempted[-1]
            preempted.append((victim.seq_id, victim.num_output_tokens))
        bm.check_consistency(sched.unfinished())

    done = drive(sched, fake_runner(bm), on_step=check)
    assert preempted and preempted[0][0] == 2 and preempted[0][1] > 0  # it had outputs to keep
    assert set(done) == {0, 1, 2}
    for seq in seqs:
        assert seq.num_output_tokens == 12 and seq.output_token_ids == solo(seq, 24)
    assert bm.num_free_blocks == 6


@pytest.mark.parametrize("setup", [
    dict(),  # plenty of memory
    dict(num_blocks=10, max_model_len=40, max_num_batched_tokens=40),  # preemptions
    dict(num_blocks=10, max_model_len=40, max_num_batched_tokens=40, chunked_prefill=False),
    dict(num_blocks=12, block_size=1, max_model_len=12, max_num_batched_tokens=8),
    dict(prefix=False, max_num_batched_tokens=8),
])
def test_outputs_do_not_depend_on_the_schedule(fake_runner, drive, setup):
    sched, bm = make(**setup)
    max_model_len = sched.config.max_model_len
    seqs = [s for s in workload(12) if s.num_tokens <= max_model_len]
    for seq in seqs:
        sched.add(seq)
    drive(sched, fake_runner(bm), on_step=lambda out: bm.check_consistency(sched.unfinished()))
    for seq in seqs:
        assert seq.output_token_ids == solo(seq, max_model_len), seq
    assert bm.num_free_blocks == bm.num_blocks


def test_shared_system_prompt_is_computed_once(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm)
    first = Sequence(0, SYSTEM + [1, 2], max_tokens=2)
    sched.add(first)
    drive(sched, runner)
    second = Sequence(1, SYSTEM + [3, 4, 5], max_tokens=2)
    sched.add(second)
    out, _ = step(sched, runner)
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (12, 3)
    assert second.num_cached_prefix_tokens == 12 and bm.hits == 12
    drive(sched, runner)
    assert second.output_token_ids == solo(second, 64)


def test_abort_frees_blocks_waiting_or_running(fake_runner):
    sched, bm = make(max_num_seqs=1)
    runner = fake_runner(bm)
    a, b = Sequence(0, list(range(9)), max_tokens=5), Sequence(1, [1, 2], max_tokens=5)
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert bm.num_used_blocks == 3
    assert sched.abort(0) is a and a.finish_reason == "abort" and a.block_table == []
    assert bm.num_used_blocks == 0 and sched.abort(0) is None and sched.abort(42) is None
    out = sched.schedule()  # b runs now; abort it mid-step: update skips it
    assert sched.abort(1) is b and bm.num_used_blocks == 0
    assert sched.update(out, {}) == [] and not sched.has_unfinished()


@pytest.mark.parametrize("eos,expect", [(frozenset({7}), ("stop", 3)), (frozenset(), ("length", 5))])
def test_eos_or_max_tokens_finish(fake_runner, drive, eos, expect):
    sched, bm = make()
    outputs = iter([3, 4, 7, 8, 9])
    runner = fake_runner(bm, token_fn=lambda seq, context: next(outputs))
    seq = Sequence(0, [1, 2], max_tokens=5, eos_token_ids=eos)
    sched.add(seq)
    done = drive(sched, runner)
    assert done == {0: seq} and (seq.finish_reason, seq.num_output_tokens) == expect
    assert seq.output_token_ids == [3, 4, 7, 8, 9][:expect[1]]  # the EOS token is kept
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("prompt_len,expect", [(10, 2), (12, 1)])
def test_max_model_len_caps_generation(fake_runner, drive, prompt_len, expect):
    sched, bm = make(max_model_len=12)
    seq = Sequence(0, list(range(prompt_len)), max_tokens=100)
    sched.add(seq)
    drive(sched, fake_runner(bm))
    assert (seq.finish_reason, seq.num_output_tokens) == ("length", expect)


def test_add_refuses_what_can_never_run():
    sched, _ = make(max_model_len=12)
    with pytest.raises(ValueError, match=r"13 tokens.*max_model_len \(12\)"):
        sched.add(Sequence(0, list(range(13)), max_tokens=1))
    sched.add(Sequence(1, [1], max_tokens=1))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(Sequence(1, [2], max_tokens=1))
    with pytest.raises(ValueError, match="KV cache holds 8 tokens"):
        Scheduler(SchedulerConfig(max_model_len=16), BlockManager(2, 4))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="enable chunked_prefill"):
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=128, chunked_prefill=False)


def test_update_wants_a_token_for_every_sampling_sequence(fake_runner):
    sched, bm = make()
    sched.add(Sequence(0, [1, 2], max_tokens=3))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no token for it"):
        sched.update(out, {})
    assert sched.update(out, {0: [5]}) == [] and sched.get(0).output_token_ids == [5]


def test_fork_shares_the_prompt_and_copies_on_write(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm, token_fn=lambda seq, context: greedy(context + [seq.seq_id]))
    parent = Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=4)
    sched.add(parent)
    step(sched, runner)
    child = sched.fork(0, 1)
    assert child.block_table == parent.block_table and sched.num_running == 2
    shared = parent.block_table[1]  # holds 2 of 4 slots: both will write into it
    out, _ = step(sched, runner)
    # the parent writes first, so it gets the copy; the child then owns the original alone
    assert out.copy_ops == [(shared, parent.block_table[1])] and child.block_table[1] == shared
    drive(sched, runner)
    assert parent.num_output_tokens == child.num_output_tokens == 4
    assert parent.output_token_ids[0] == child.output_token_ids[0]  # sampled before the fork
    assert parent.output_token_ids != child.output_token_ids
    assert bm.num_free_blocks == bm.num_blocks


def test_fork_sampled_starts_a_child_on_the_parents_prompt_blocks(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm, token_fn=lambda seq, context: greedy(context + [seq.seq_id]))
    parent = Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=4)
    sched.add(parent)
    step(sched, runner)  # the prompt's one prefill
    child = Sequence(1, [1, 2, 3, 4, 5, 6], max_tokens=4)
    sched.fork_sampled(0, child, 33)
    assert child.output_token_ids == [33] and child.num_computed_tokens == 6
    assert child.block_table == parent.block_table and bm.ref_count(parent.block_table[0]) == 2
    out, _ = step(sched, runner)
    assert [s.num_tokens for s in out.scheduled] == [1, 1]  # no prompt token is computed twice
    assert len(out.copy_ops) == 1  # the shared, partly filled last block is copied once
    drive(sched, runner)
    assert child.num_output_tokens == 4 and bm.num_free_blocks == bm.num_blocks


def test_fork_sampled_after_the_parent_finished_recomputes_or_stops(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm)
    parent = Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=1)
    sched.add(parent)
    step(sched, runner)
    assert parent.is_finished
    late = Sequence(1, [1, 2, 3, 4, 5, 6], max_tokens=3)
    sched.fork_sampled(0, late, 7)  # the parent is gone: it queues and prefills (from the prefix cache)
    assert late.status is SequenceStatus.WAITING and sched.num_waiting == 1
    drive(sched, runner)
    assert late.output_token_ids[0] == 7 and late.num_output_tokens == 3
    done = Sequence(2, [1, 2, 3, 4, 5, 6], max_tokens=1)
    sched.fork_sampled(0, done, 8)  # max_tokens reached by its first token: finished, never scheduled
    assert done.status is SequenceStatus.FINISHED_LENGTH and sched.get(2) is None
    eos = Sequence(3, [1, 2, 3, 4, 5, 6], max_tokens=5, eos_token_ids=frozenset({9}))
    sched.fork_sampled(0, eos, 9)
    assert eos.status is SequenceStatus.FINISHED_STOPPED and sched.get(3) is None
    assert bm.num_free_blocks == bm.num_blocks


def test_a_child_that_waits_for_room_queues_before_later_requests(fake_runner):
    # n > 1 with the batch full: the child waits, in its request's place (ahead of requests that came later),
    # as a preempted sequence goes back to the front.
    sched, bm = make(max_num_seqs=1)
    runner = fake_runner(bm)
    sched.add(Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=4, arrival_time=0.0))
    step(sched, runner)
    sched.add(Sequence(1, [7, 8, 9], max_tokens=4, arrival_time=1.0))  # a later request, waiting
    child = Sequence(2, [1, 2, 3, 4, 5, 6], max_tokens=4, arrival_time=0.0)
    sched.fork_sampled(0, child, 33)
    assert child.status is SequenceStatus.WAITING and sched.num_waiting == 2
    step(sched, runner)
    step(sched, runner)
    step(sched, runner)  # the parent's last token: room for one more
    out, _ = step(sched, runner)
    assert [s.seq.seq_id for s in out.scheduled] == [2]


def test_fork_sampled_refuses_bad_children(fake_runner):
    sched, bm = make()
    sched.add(Sequence(0, [1, 2, 3], max_tokens=4))
    step(sched, fake_runner(bm))
    with pytest.raises(ValueError, match="does not share the prompt"):
        sched.fork_sampled(0, Sequence(1, [1, 2, 4], max_tokens=4), 5)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.fork_sampled(0, Sequence(0, [1, 2, 3], max_tokens=4), 5)
    used = Sequence(2, [1, 2, 3], max_tokens=4)
    used.append_token(6)
    with pytest.raises(ValueError, match="must be new"):
        sched.fork_sampled(0, used, 5)


def test_rollback_recomputes_the_last_token_and_finishes_right(fake_runner, drive):
    sched, bm = make()
    runner = fake_runner(bm)
    seq = Sequence(0, [1, 2, 3], max_tokens=8)
    sched.add(seq)
    for _ in range(4):
        step(sched, runner)
    assert seq.num_output_tokens == 4
    bm.rollback(seq, 2)  # the last two were "rejected drafts"
    assert seq.num_computed_tokens == seq.num_tokens == 5
    out, _ = step(sched, runner)
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (4, 1)
    drive(sched, runner)
    assert seq.output_token_ids == solo(seq, 64)


def test_rollback_to_a_block_boundary_keeps_the_prefix_cached(fake_runner):
    sched, bm = make()
    runner = fake_runner(bm)
    seq = Sequence(0, [1, 2, 3, 4, 5, 6, 7], max_tokens=8)
    sched.add(seq)
    for _ in range(3):
        step(sched, runner)
    bm.rollback(seq, 2)  # 8 tokens, all computed: the last one is computed again
    out, _ = step(sched, runner)
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (7, 1)
    bm.check_consistency([seq])
    probe = Sequence(1, seq.token_ids[:8] + [0], max_tokens=1)
    assert bm.lookup_prefix(probe) == 8  # the rewritten block was named again
