"""What the engine hands back: per request, the completions so far (incremental each step)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of a request's `n` completions.

    `token_ids`/`text` hold everything generated so far (stop strings removed from `text`);
    `logprobs[i]` is the chosen token's logprob and `top_logprobs[i]` the best (token, logprob)
    pairs at step i, when the request asked for logprobs. `finish_reason`: None while running,
    then "stop" (eos, stop token or stop string), "length" or "abort".
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


@dataclass
class RequestOutput:
    """The state of one request after an engine step. `finished` when every completion is."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[float | None] | None = None  # None for the first token (nothing predicts it)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival, first_token and finish times (perf_counter)
