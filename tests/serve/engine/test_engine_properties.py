"""Random interleavings of add / step / abort / fork / rollback never leak or double-free a block.

After every operation: each block's refcount equals the references in live block tables, free plus
used equals num_blocks, and every block is in exactly one pool (`check_consistency`). Every step the
fake runner checks the simulated KV that attention reads. At the end, with everything finished, all
blocks are free, and every sequence that was not aborted produced exactly the tokens it produces
when decoded alone (the fake model is deterministic), whatever preemption, prefix reuse, fork or
rollback happened on the way.
"""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimlm.serve.engine import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus

VOCAB = 4  # few token ids: prompts share prefixes and EOS (0) comes up often
BASES = [[], [1, 2, 3, 1, 2, 3, 1, 2], [1, 2, 3, 3]]


def greedy(tokens):
    return hash(tuple(tokens)) % VOCAB  # conftest.prefix_token with this vocabulary


def solo(seq, max_model_len):
    tokens = list(seq.prompt_token_ids)
    for _ in range(seq.max_tokens):
        tokens.append(greedy(tokens))
        if tokens[-1] in seq.eos_token_ids or len(tokens) >= max_model_len:
            break
    return tokens[seq.num_prompt_tokens:]


@st.composite
def setups(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(4, 20))
    min_blocks = -(-max_model_len // block_size)
    max_num_seqs = draw(st.integers(1, 5))
    chunked = draw(st.booleans())
    budget = draw(st.integers(max_num_seqs, 24))
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
                             chunked_prefill=chunked)
    bm = BlockManager(draw(st.integers(min_blocks, min_blocks + 4)), block_size,
                      enable_prefix_caching=draw(st.booleans()))
    return Scheduler(config, bm)


def check(sched, everyone):
    bm = sched.block_manager
    live = sched.unfinished()
    bm.check_consistency(live)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for seq in everyone:
        if seq.is_finished:
            assert seq.block_table == [] and sched.get(seq.seq_id) is None
        elif seq.status is SequenceStatus.WAITING:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        else:
            assert seq.num_computed_tokens <= seq.num_tokens
    assert sched.num_waiting + sched.num_running == len(live)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sched=setups(), data=st.data())
def test_random_operations_keep_blocks_consistent(fake_runner, drive, sched, data):
    bm, cfg = sched.block_manager, sched.config
    runner = fake_runner(bm, vocab=VOCAB)
    everyone, aborted, next_id = [], set(), 0
    for _ in range(data.draw(st.integers(1, 40), label="ops")):
        op = data.draw(st.sampled_from(["add", "add", "step", "step", "step", "abort", "fork",
                                        "rollback"]), label="op")
        live = sched.unfinished()
        running = [s for s in live if s.status is SequenceStatus.RUNNING]
        if op == "add":
            base = data.draw(st.sampled_from(BASES), label="base")
            tail = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), label="tail")
            prompt = (base + tail)[-cfg.max_model_len:]
            eos = data.draw(st.sampled_from([frozenset(), frozenset({0})]), label="eos")
            seq = Sequence(next_id, prompt, data.draw(st.integers(1, 10), label="max_tokens"), eos)
            sched.add(seq)
            everyone.append(seq)
            next_id += 1
        elif op == "step":
            out = sched.schedule()
            assert out.num_batched_tokens <= cfg.max_num_batched_tokens
            assert len(out.scheduled) <= cfg.max_num_seqs
            for victim in out.preempted:
                assert victim.status is SequenceStatus.WAITING and victim.block_table == []
            sched.update(out, runner.step(out))
        elif op == "abort" and live:
            seq = data.draw(st.sampled_from(live), label="abort")
            assert sched.abort(seq.seq_id) is seq and seq.block_table == []
            aborted.add(seq.seq_id)
        elif op == "fork" and live:
            parent = data.draw(st.sampled_from(live), label="parent")
            everyone.append(sched.fork(parent.seq_id, next_id))
            next_id += 1
        elif op == "rollback":
            candidates = [s for s in running if s.num_output_tokens]
            if candidates:
                seq = data.draw(st.sampled_from(candidates), label="rollback")
                bm.rollback(seq, data.draw(st.integers(1, seq.num_output_tokens), label="n"))
        check(sched, everyone)

    drive(sched, runner, max_steps=2000, on_step=lambda out: check(sched, everyone))
    check(sched, everyone)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
    bm.check_consistency([])
    for seq in everyone:
        if seq.seq_id not in aborted:
            assert seq.output_token_ids == solo(seq, cfg.max_model_len), seq
