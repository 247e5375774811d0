"""A fake model runner that holds the scheduler to its contract with a simulated paged KV cache.

Instead of K/V tensors, every slot stores a fingerprint of the whole prefix ending at that
position (what a real K/V vector depends on). Each step the fake runner performs the copy ops,
writes the fingerprints of the scheduled tokens into the slots the block tables name, then checks
that every position the sequence attends to holds exactly its own prefix's fingerprint. So prefix
reuse, copy-on-write, preemption and rollback are checked against what attention would read.
"""
import pytest


def fingerprints(tokens):
    out, h = [], 0
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


def prefix_token(tokens, vocab):
    """A deterministic "greedy" next token: depends only on the tokens, like a real model."""
    return hash(tuple(tokens)) % vocab


class FakeRunner:
    def __init__(self, block_manager, token_fn=None, vocab=50):
        self.bm = block_manager
        self.bs = block_manager.block_size
        self.kv = [None] * (block_manager.num_blocks * self.bs)
        # token_fn(seq, context): context is the tokens the step actually computed up to
        self.token_fn = token_fn or (lambda seq, context: prefix_token(context, vocab))
        self.steps = 0

    def slot(self, seq, pos):
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def step(self, out):
        bs, kv = self.bs, self.kv
        for src, dst in out.copy_ops:  # copies first, before any write of the step
            assert src != dst
            kv[dst * bs:(dst + 1) * bs] = kv[src * bs:(src + 1) * bs]
        written, fps = set(), {}
        for s in out.scheduled:
            seq = s.seq
            assert s.start == seq.num_computed_tokens and s.num_tokens >= 1
            assert s.start + s.num_tokens <= seq.num_tokens
            assert s.sample == (s.start + s.num_tokens == seq.num_tokens), "samples mid-prefill"
            assert len(seq.block_table) * bs >= s.start + s.num_tokens, "block table too short"
            fp = fps[seq.seq_id] = fingerprints(seq.token_ids[:s.start + s.num_tokens])
            for pos, slot in zip(s.positions, s.slot_mapping(bs)):
                assert slot == self.slot(seq, pos)
                assert slot not in written, f"slot {slot} written twice in one step"
                written.add(slot)
                kv[slot] = fp[pos]
        for s in out.scheduled:  # attention reads the whole context after the batch's writes
            fp = fps[s.seq.seq_id]
            for pos in range(s.start + s.num_tokens):
                assert kv[self.slot(s.seq, pos)] == fp[pos], (
                    f"sequence {s.seq.seq_id} reads wrong KV at position {pos}")
        self.steps += 1
        return {s.seq.seq_id: [self.token_fn(s.seq, s.seq.token_ids[:s.start + s.num_tokens])]
                for s in out.scheduled if s.sample}


def run_to_completion(scheduler, runner, max_steps=10_000, on_step=None):
    """Step until every sequence finished; returns {seq_id: Sequence} of the finished ones."""
    done = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return done
        out = scheduler.schedule()
        if on_step:
            on_step(out)
        for seq in scheduler.update(out, runner.step(out)):
            done[seq.seq_id] = seq
    raise AssertionError(f"not finished after {max_steps} steps")


@pytest.fixture(scope="session")
def fake_runner():
    return FakeRunner


@pytest.fixture(scope="session")
def drive():
    return run_to_completion


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the speculation tests time steps; two threads on a shared
    2-core machine make those timings noisy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
