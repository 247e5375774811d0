"""A model cascade (lossy, opt-in): a small model answers; the large one answers what it is unsure of.

`Cascade(small, large, threshold).generate(prompts, params)` runs every prompt through the small model
(for example a pruned and distilled student), scores each answer by its confidence, the mean log-
probability of its tokens under the small model (the log of their geometric-mean probability), and
sends the prompts whose answer scores below `threshold` to the large model, whose answer replaces the
small one's. Every prompt is answered once by the small model; the escalated ones cost a second,
large-model generation. So the cascade is faster than the large model alone when the small model is
much faster and most answers are confident, and its answers differ from the large model's on the
confident prompts where the small model is wrong: `scripts/cascade.py` measures both sides (speed, the
share escalated, agreement with the large model's answers and their perplexity under it) at several
thresholds. With n > 1 completions a prompt is escalated when any completion is below the threshold.

Both models must share a tokenizer (the same vocabulary): prompts may be token ids.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .engine.outputs import CompletionOutput, RequestOutput
from .llm import LLM
from .sampling_params import SamplingParams


@dataclass
class CascadeOutput:
    """The answer to one prompt: the request output of the model that answered, which model that was
    ("small" or "large"), and the small model's confidence (mean token logprob of its answer)."""

    output: RequestOutput
    answered_by: str
    confidence: float


def confidence(completion: CompletionOutput) -> float:
    """Mean logprob of a completion's tokens (0 for an empty one); needs logprobs requested."""
    if completion.logprobs is None:
        raise ValueError("confidence needs the completion's logprobs: generate with SamplingParams(logprobs=0)")
    values = [lp for lp in completion.logprobs if lp is not None and math.isfinite(lp)]
    return sum(values) / len(values) if values else 0.0


class Cascade:
    """Small model first, the large one for answers below `threshold` (see the module docstring)."""

    def __init__(self, small: LLM, large: LLM, threshold: float):
        if not math.isfinite(threshold) or threshold > 0:
            raise ValueError(f"threshold is a mean token logprob: a number <= 0, got {threshold}")
        vocab = (small.engine.model.args.vocab_size, large.engine.model.args.vocab_size)
        if vocab[0] != vocab[1]:
            raise ValueError(f"the small model's vocabulary ({vocab[0]} tokens) is not the large model's "
                             f"({vocab[1]}): a cascade needs one tokenizer")
        self.small, self.large, self.threshold = small, large, threshold

    def generate(self, prompts, params: SamplingParams | None = None) -> list[CascadeOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        scored = params if params.logprobs is not None else dataclasses.replace(params, logprobs=0)
        first = self.small.generate(prompts, scored)
        conf = [min(confidence(c) for c in out.outputs) for out in first]
        unsure = [i for i, c in enumerate(conf) if c < self.threshold]
        second = dict(zip(unsure, self.large.generate([prompts[i] for i in unsure], params))) if unsure else {}
        results = []
        for i, out in enumerate(first):
            if i in second:
                results.append(CascadeOutput(second[i], "large", conf[i]))
                continue
            if params.logprobs is None:  # asked for by the cascade only: not part of the answer
                for c in out.outputs:
                    c.logprobs = c.top_logprobs = None
            results.append(CascadeOutput(out, "small", conf[i]))
        return results
