"""Continuous batching: which sequences compute how many tokens in the next model step.

Every step the scheduler fills a token budget. Running sequences go first, oldest first (a decode
costs 1 token; a sequence still prefilling takes the rest of its prompt, or a chunk of it), then
waiting sequences are admitted in arrival order (FCFS) while the budget, `max_num_seqs` and free
KV blocks allow. With chunked prefill a long prompt is split across steps and mixed with decodes,
so decoding sequences keep streaming while a big prompt arrives.

When a running sequence cannot get a block for its next tokens, the most recently arrived running
sequence is preempted by recompute: its blocks are freed and it goes back to the FRONT of the
waiting queue, with its outputs kept as part of its tokens. Dropping the newest and re-admitting it
first keeps FCFS order while guaranteeing the oldest sequences always make progress. Recompute is
cheap here because freed full blocks stay in the prefix cache until evicted.
"""
from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    """Limits of one step; `max_model_len` caps prompt plus output tokens of a sequence."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    chunked_prefill: bool = True

    def __post_init__(self):
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) < max_num_seqs "
                f"({self.max_num_seqs}): a full batch could not even decode one token per sequence; "
                "raise max_num_batched_tokens or lower max_num_seqs")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt must fit one step, but max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) < max_model_len ({self.max_model_len}); enable "
                "chunked_prefill or raise max_num_batched_tokens")


@dataclass(frozen=True)
class ScheduledSeq:
    """`num_tokens` tokens of `seq` to compute this step, at positions `start .. start + num_tokens - 1`.

    `start` is `seq.num_computed_tokens` at scheduling time. When `sample` is true the chunk ends at
    the sequence's last token and the runner samples one token from the last position's logits;
    otherwise (a prefill chunk that is not the last) the runner samples nothing for it.
    """

    seq: Sequence
    num_tokens: int
    start: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_tokens]

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_tokens)

    def slot_mapping(self, block_size: int) -> list[int]:
        """KV cache slot each new token is written to."""
        table = self.seq.block_table
        return [table[p // block_size] * block_size + p % block_size for p in self.positions]


@dataclass
class SchedulerOutput:
    """One step's plan. The runner first performs every `copy_ops` (src_block -> dst_block, all
    layers, K and V), then runs `scheduled`, then hands the sampled tokens to `Scheduler.update`."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copy_ops: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting queue and the running set; `schedule()` then `update()` once per step."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        capacity = block_manager.num_blocks * block_manager.block_size
        if capacity < config.max_model_len:
            # A sequence alone must always fit, or preemption could never make room for it.
            raise ValueError(f"the KV cache holds {capacity} tokens, fewer than max_model_len "
                             f"({config.max_model_len}); give it more blocks or lower max_model_len")
        self.config = config
        self.block_manager = block_manager
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # sorted oldest first by _key
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence, by id
        self._keys: dict[int, tuple[float, int]] = {}
        self._counter = itertools.count()
        self.num_preemptions = 0  # sequences preempted (their KV freed, to be computed again), ever

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._seqs.get(seq_id)

    def unfinished(self) -> list[Sequence]:
        return list(self._seqs.values())

    def _key(self, seq: Sequence) -> tuple[float, int]:
        return self._keys[seq.seq_id]

    # -- requests ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled; ids must be unique")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is {seq.status.name}; only a new sequence can "
                             "be added")
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"the prompt of sequence {seq.seq_id} has {seq.num_tokens} tokens, more "
                             f"than max_model_len ({self.config.max_model_len}); shorten the prompt "
                             "or raise max_model_len")
        self._keys[seq.seq_id] = (seq.arrival_time, next(self._counter))
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Cancel a sequence and free its blocks at once; None if it is unknown or already done.

        Call it between steps: a step already scheduled for it is skipped by `update`."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED_ABORTED
        del self._keys[seq_id]
        return seq

    def fork(self, parent_id: int, child_id: int) -> Sequence:
        """A copy of sequence `parent_id` that shares its KV blocks (n > 1 sampling, beam search).

        A running parent with room in the batch gives a running child that shares every block;
        otherwise the child waits and recomputes (mostly from the prefix cache). Call between steps.
        """
        parent = self._seqs.get(parent_id)
        if parent is None:
            raise ValueError(f"fork: no unfinished sequence with id {parent_id}")
        if child_id in self._seqs:
            raise ValueError(f"fork: sequence id {child_id} is already scheduled")
        child = parent.clone(child_id)
        self._adopt(parent, child)
        return child

    def fork_sampled(self, parent_id: int, child: Sequence, token: int) -> None:
        """Start `child`, a new sequence with the prompt of `parent_id`, from `token`: its first output,
        sampled from the same prompt logits as the parent's (n > 1 sampling, forked after one prefill).

        While the parent runs, the child shares its prompt blocks, the partly filled last one included
        (copied on the first write); if the parent has finished, the child queues and recomputes its
        prompt (mostly from the prefix cache). A token that stops the child (EOS, max_tokens) finishes
        it at once, and it never enters the scheduler. Call between steps, after `update`.
        """
        if child.seq_id in self._seqs:
            raise ValueError(f"fork: sequence id {child.seq_id} is already scheduled")
        if child.status is not SequenceStatus.WAITING or child.block_table or child.num_output_tokens:
            raise ValueError(f"fork: sequence {child.seq_id} must be new (waiting, no blocks, no output)")
        parent = self._seqs.get(parent_id)
        if parent is not None and parent.prompt_token_ids != child.prompt_token_ids:
            raise ValueError(f"fork: sequence {child.seq_id} does not share the prompt of sequence {parent_id}")
        child.append_token(token)
        if (status := self._stop_status(child)) is not None:
            child.status = status
            return
        if parent is None:
            self._keys[child.seq_id] = (child.arrival_time, next(self._counter))
            self._seqs[child.seq_id] = child
            self._waiting.appendleft(child)  # its request was admitted before anything still waiting
            return
        self._adopt(parent, child)

    def _adopt(self, parent: Sequence, child: Sequence) -> None:
        self._keys[child.seq_id] = (parent.arrival_time, next(self._counter))
        self._seqs[child.seq_id] = child
        if parent.status is SequenceStatus.RUNNING and len(self._running) < self.config.max_num_seqs:
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            bisect.insort(self._running, child, key=self._key)
        else:  # queued by its request's arrival: behind its parent and siblings, before later requests
            at = next((i for i, s in enumerate(self._waiting) if self._key(s) > self._keys[child.seq_id]),
                      len(self._waiting))
            self._waiting.insert(at, child)

    def _stop_status(self, seq: Sequence) -> SequenceStatus | None:
        """How seq finishes after its last token was appended: EOS, max_tokens or max_model_len; None: it goes on."""
        if seq.last_token_id in seq.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    # -- one step ------------------------------------------------------------------------------
    def _chunk(self, remaining: int, room: int) -> int:
        if self.config.chunked_prefill:
            return max(0, min(remaining, room))
        return remaining if remaining <= room else 0

    def _fit(self, seq: Sequence, n: int) -> int:
        """The most tokens, up to n, that seq can get blocks for right now."""
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.block_manager.can_allocate(seq, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _preempt(self, out: SchedulerOutput) -> Sequence:
        victim = self._running.pop()  # the most recently arrived
        self.block_manager.free(victim)
        victim.status = SequenceStatus.WAITING
        self._waiting.appendleft(victim)
        out.preempted.append(victim)
        self.num_preemptions += 1
        return victim

    def schedule(self) -> SchedulerOutput:
        """Plan the next step. Each scheduled sequence's block table covers `start + num_tokens`."""
        bm, out = self.block_manager, SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        running = self._running

        def is_decode(s: Sequence) -> bool:
            return s.num_tokens - s.num_computed_tokens <= 1

        decodes_left = sum(map(is_decode, running))  # budget kept back for the decodes behind us
        i = 0
        while i < len(running):
            seq = running[i]
            if is_decode(seq):
                decodes_left -= 1
            if seq.num_computed_tokens == seq.num_tokens:
                # Everything computed (a rollback just dropped tokens): the last token's logits are
                # gone, so compute it again. allocate() makes its block writable.
                seq.num_computed_tokens -= 1
            n = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget - decodes_left)
            if n == 0:  # a prefill that does not fit this step; it keeps its blocks and waits
                i += 1
                continue
            # Short of blocks, a prefill chunk shrinks to what fits; preempt only if nothing does.
            while not bm.can_allocate(seq, 1 if self.config.chunked_prefill else n):
                victim = running[-1]
                if victim is not seq and is_decode(victim):
                    decodes_left -= 1
                self._preempt(out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the newest: nothing behind it is left
            if not bm.can_allocate(seq, n):
                n = self._fit(seq, n)
            start = seq.num_computed_tokens
            bm.allocate(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n, start, start + n == seq.num_tokens))
            budget -= n
            i += 1

        # Admit waiting sequences in order; not after a preemption, memory is already short.
        while (not out.preempted and self._waiting and budget > 0
               and len(running) < self.config.max_num_seqs):
            seq = self._waiting[0]
            cached = bm.lookup_prefix(seq)
            n = self._chunk(seq.num_tokens - cached, budget)
            if n == 0 or not bm.can_allocate(seq, n):
                break  # FCFS: nobody overtakes the head of the queue
            self._waiting.popleft()
            bm.allocate(seq, n)  # takes the cached prefix first: num_computed_tokens == cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(running, seq, key=self._key)
            start = seq.num_computed_tokens
            out.scheduled.append(ScheduledSeq(seq, n, start, start + n == seq.num_tokens))
            budget -= n

        out.copy_ops = bm.pop_copy_ops()
        return out

    def update(self, scheduled: list[ScheduledSeq] | SchedulerOutput,
               new_tokens: dict[int, list[int]]) -> list[Sequence]:
        """Record a finished model step; return the sequences that finished in it.

        `new_tokens[seq_id]` holds the sampled token(s) of each scheduled sequence whose `sample` is
        true (entries for other sequences are ignored). Stops on EOS, `max_tokens` or
        `max_model_len`; a finished sequence's blocks are freed (their full blocks stay cached).
        """
        if isinstance(scheduled, SchedulerOutput):
            scheduled = scheduled.scheduled
        live = [s for s in scheduled if s.seq.status is SequenceStatus.RUNNING]  # not aborted since
        for s in live:
            if s.seq.num_computed_tokens != s.start:
                raise RuntimeError(f"sequence {s.seq.seq_id} changed between schedule() and update()")
            if s.sample and not new_tokens.get(s.seq.seq_id):
                raise ValueError(f"sequence {s.seq.seq_id} was due to sample this step, but "
                                 "new_tokens has no token for it")
        finished = []
        for s in live:
            seq = s.seq
            seq.num_computed_tokens += s.num_tokens
            self.block_manager.register_full_blocks(seq)
            if not s.sample:
                continue
            for token in new_tokens[seq.seq_id]:
                seq.append_token(token)
                if (status := self._stop_status(seq)) is not None:
                    seq.status = status
                    break
            if seq.is_finished:
                self._running.remove(seq)
                self.block_manager.free(seq)
                del self._seqs[seq.seq_id], self._keys[seq.seq_id]
                finished.append(seq)
        return finished
