"""One request's tokens and its place in the engine: the state the scheduler and block manager share.

A `Sequence` is deliberately dumb. The scheduler decides when it runs, the block manager decides
where its KV lives, and sampling options stay opaque (`params`) so this module needs neither torch
nor a model config. The one number everything hinges on is `num_computed_tokens`: how many leading
tokens already have their KV written into the blocks of `block_table`. A step computes tokens
`[num_computed_tokens, num_computed_tokens + n)`; tokens past that are known (prompt, or outputs to be
recomputed after a preemption) but have no KV yet.
"""
from __future__ import annotations

import enum
from typing import Any


class SequenceStatus(enum.Enum):
    """Lifecycle of a sequence; the FINISHED_* values carry the OpenAI `finish_reason`."""

    WAITING = "waiting"  # queued, holds no blocks (new, or preempted by recompute)
    RUNNING = "running"  # holds blocks; prefilling (maybe in chunks) or decoding
    FINISHED_STOPPED = "stop"  # sampled an EOS token
    FINISHED_LENGTH = "length"  # hit max_tokens or the model's max length
    FINISHED_ABORTED = "abort"  # cancelled by the client

    @property
    def is_finished(self) -> bool:
        return self.value not in ("waiting", "running")


class Sequence:
    """A prompt plus the tokens generated so far, and the bookkeeping to resume it at any step.

    `eos_token_ids` are the ids that stop generation; pass an empty set to ignore EOS (the engine
    maps `ignore_eos` to that, so there is one way to say it). Output tokens are part of `token_ids`,
    which is what lets a preempted sequence be recomputed as if its outputs were prompt.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        max_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        params: Any = None,
        arrival_time: float = 0.0,
    ):
        if len(prompt_token_ids) == 0:
            raise ValueError(f"sequence {seq_id}: the prompt is empty; at least one token is needed "
                             "to produce the first logits")
        if max_tokens < 1:
            raise ValueError(f"sequence {seq_id}: max_tokens must be at least 1, got {max_tokens}")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        # KV bookkeeping, written only by BlockManager / Scheduler.
        self.num_computed_tokens = 0
        # Prompt tokens reused from the prefix cache at the first admission (None before it): a sequence admitted
        # again after a preemption finds its own KV cached, which is no hit for the request.
        self.num_cached_prefix_tokens: int | None = None
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full, computed blocks that the block manager has already
        # offered to the prefix cache; its length is where registration resumes next step.
        self.block_hashes: list[bytes] = []
        # True when every prompt position must be computed (prompt logprobs): no prefix-cache reuse.
        self.skip_prefix_cache = False

    # -- token views ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """'stop' | 'length' | 'abort' once finished (as the OpenAI API spells them), else None."""
        return self.status.value if self.status.is_finished else None

    # -- mutation ------------------------------------------------------------------------------
    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_last_tokens(self, n: int) -> None:
        """Forget the last `n` output tokens (rejected draft tokens); the prompt is never dropped."""
        if n < 0 or n > self.num_output_tokens:
            raise ValueError(f"sequence {self.seq_id}: cannot drop {n} tokens, it has "
                             f"{self.num_output_tokens} output tokens (the prompt cannot be dropped)")
        if n:
            del self.token_ids[-n:]

    def clone(self, seq_id: int) -> "Sequence":
        """A fresh WAITING copy of the tokens and options (for n > 1 sampling / beam search forks)."""
        child = Sequence(seq_id, self.prompt_token_ids, self.max_tokens, self.eos_token_ids,
                         self.params, self.arrival_time)
        child.token_ids.extend(self.output_token_ids)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={self.num_tokens} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens}, "
                f"blocks={self.block_table})")
