"""Prompt-lookup speculative decoding (`--speculative ngram`): drafts copied from the sequence's own text.

No draft model and no draft pass: a sequence's last n tokens (n from `prompt_lookup` down to
`prompt_lookup_min`) are looked up in its own prompt and output, and the tokens that followed their
latest earlier occurrence are the draft. One pass of the target over `[last token, d_1 .. d_k]`
verifies them (`verify_rows`: a decode row per token, so greedy output is the plain engine's, in bf16
too wherever both take the same kernels); sampled requests keep a draft token with the target's
probability of it and otherwise sample the target's distribution without it (speculative sampling with a
draft distribution that is certain of its token), so their tokens follow the target's distribution.

Pays where outputs repeat their context: quoting or rewriting a document, editing code, extracting fields,
summaries that reuse the source's phrases, text that loops. Elsewhere no n-gram matches and the step is a
plain one. The draft length follows each sequence's acceptance (the policy `SelfSpeculator` defines),
counted only on steps that found a match; a draft costs nothing but its verify rows. Because drafting is
free, a step where some sequences found a draft and others did not runs them all in the one verify pass
(one row for a sequence without a draft: exactly its plain decode row), instead of the plain ones in a
pass of their own.

The lookup index is kept per sequence and grows with its tokens (a dict per n from each n-gram to the
latest position after which a token followed), so a step costs a dict lookup per n, whatever the length.
"""
from __future__ import annotations

import torch

from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import SchedulerOutput
from .speculative import SelfSpeculator, SpeculativeConfig, expected_tokens, verify_rows


class NgramIndex:
    """The latest occurrence of every n-gram (n in [lo, hi]) of a growing token list that some token followed."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(lo, hi + 1)}
        self.indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
        (at least `lo` tokens long) seen before; [] when none."""
        end = len(tokens) - 1  # an n-gram ending at `end` (exclusive) is followed by tokens[end]
        for stop in range(self.indexed + 1, end + 1):
            for n in range(self.lo, min(self.hi, stop) + 1):
                self.latest[n][tuple(tokens[stop - n:stop])] = stop
        self.indexed = max(self.indexed, end)
        for n in range(min(self.hi, len(tokens)), self.lo - 1, -1):
            at = self.latest[n].get(tuple(tokens[-n:]))
            if at is not None:
                return tokens[at:at + k]
        return []


class NgramSpeculator(SelfSpeculator):
    """Plans and runs prompt-lookup speculative steps for an `LLMEngine` (see the module docstring)."""

    def __init__(self, model, config: SpeculativeConfig):
        if config.num_draft < 1:
            raise ValueError(f"num_draft must be at least 1, got {config.num_draft}")
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup:
            raise ValueError("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup, got "
                             f"{config.prompt_lookup_min} and {config.prompt_lookup}")
        if config.exit_confidence is not None or config.draft_head is not None:
            raise ValueError("exit_confidence and draft_head need a draft that computes logits; prompt lookup "
                             "copies its drafts from the text")
        self._init_policy(model, config)
        self.exit_layer = None
        self.index: dict[int, NgramIndex] = {}
        self.proposals: dict[int, list[int]] = {}

    def model_speedup(self, acceptance: float, k: int) -> float:
        """Drafts are free; each verified token beyond the first costs `verify_cost` of a step."""
        return 1.0 if k == 0 else expected_tokens(acceptance, k) / (1 + self.config.verify_cost * k)

    def plan(self, out: SchedulerOutput, bm: BlockManager, max_model_len: int) -> dict[int, int]:
        """Draft lengths `{seq_id: k >= 0}` with KV slots reserved; empty (a plain step) unless some sequence
        found a draft worth verifying. Eligible sequences without one join the verify pass with k = 0."""
        decodes = [s for s in out.scheduled if s.sample and s.num_tokens == 1]
        self.proposals = {}
        if not decodes or len(decodes) > self.config.max_batch:
            return {}
        ks = {}
        for s in decodes:
            seq = s.seq
            if not self.eligible(seq):
                continue
            ks[seq.seq_id] = 0
            room = min(self.config.num_draft, max_model_len - seq.num_tokens - 1)
            if room < 1:
                continue
            index = self.index.setdefault(seq.seq_id, NgramIndex(self.config.prompt_lookup_min,
                                                                  self.config.prompt_lookup))
            draft = index.propose(seq.token_ids, room)
            if draft:  # the policy runs (and probes) only where there is something to verify
                k = min(self.draft_len(seq, len(decodes)), len(draft))
                if k >= 1 and bm.can_allocate(seq, 1 + k):
                    bm.allocate(seq, 1 + k)  # slots for [last token, d_1 .. d_k]
                    ks[seq.seq_id] = k
                    self.proposals[seq.seq_id] = draft[:k]
        if not self.proposals:
            return {}
        out.copy_ops.extend(bm.pop_copy_ops())
        return ks

    def _draft(self, runner: ModelRunner, spec, plan):
        return {s.seq.seq_id: [s.seq.last_token_id] + self.proposals.get(s.seq.seq_id, []) for s in spec}, None

    def _verify(self, runner: ModelRunner, spec, plan, drafts, hidden) -> dict[int, list[int]]:
        if not spec:
            return {}
        ids = [t for s in spec for t in drafts[s.seq.seq_id]]
        pos, meta = verify_rows(spec, plan, runner)
        x = self.model(torch.tensor(ids, dtype=torch.long, device=runner.device), pos, runner.kv_caches, meta)
        return self._accept(spec, plan, drafts, self.model.compute_logits(x))

    def _accept_sampled(self, sid: int, drafts: list[int], p) -> list[int]:
        """Speculative sampling where the draft is certain of each token: d_i is kept with probability
        p_i(d_i); the first one rejected is replaced by a sample of p_i without d_i (renormalised)."""
        gen = self.generator_for(sid)
        out = []
        for i, tok in enumerate(drafts):
            if torch.rand((), generator=gen).item() < p[i][tok].item():
                out.append(tok)
                continue
            rest = p[i].clone()
            rest[tok] = 0
            out.append(torch.multinomial(rest if rest.sum() > 0 else p[i], 1, generator=gen).item())
            return out
        return out + [torch.multinomial(p[len(drafts)], 1, generator=gen).item()]

    def _record(self, seq_id: int, k: int, accepted: int) -> None:
        if k:  # a row without a draft is a plain decode row: nothing to learn
            super()._record(seq_id, k, accepted)

    def forget(self, seq_id: int) -> None:
        super().forget(seq_id)
        self.index.pop(seq_id, None)
