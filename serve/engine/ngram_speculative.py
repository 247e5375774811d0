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
plain one. A draft costs nothing but its rows in the verify pass, so the policy (`choose`) prices rows: it
verifies the step's likeliest found tokens (by each sequence's running acceptance, counted only on steps
that drafted) up to the count that makes the most tokens per second, with a verify pass of R rows timed
on this machine (`step_seconds`), and drafts nothing where no count beats a plain step. Because drafting
is free, a step where some sequences found a draft and others did not runs them all in the one verify
pass (one row for a sequence without a draft: exactly its plain decode row), instead of the plain ones in
a pass of their own.

The lookup index is kept per sequence and grows with its tokens (a dict per n from each n-gram to the
latest position after which a token followed), so a step costs a dict lookup per n, whatever the length.
"""
from __future__ import annotations

import torch

from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import SchedulerOutput
from .speculative import SelfSpeculator, SpeculativeConfig, verify_logits


def accept_certain(drafts: list[int], p, gen) -> list[int]:
    """Speculative sampling where the draft is certain of each token (q_i = 1 at d_i): d_i is kept with
    probability p_i(d_i); the first one rejected is replaced by a sample of p_i without d_i (renormalised);
    with all kept, one more token is sampled from p_(k+1). `p` [k + 1, V]: the target's probabilities."""
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


def draft_room(config: SpeculativeConfig, seq, max_model_len: int) -> int:
    """Most tokens `seq` may draft this step: `num_draft`, less where the context or max_tokens ends first (the
    target adds one token of its own)."""
    return min(config.num_draft, max_model_len - seq.num_tokens - 1, seq.max_tokens - seq.num_output_tokens - 1)


def look_up(indexes: dict, config: SpeculativeConfig, seq, room: int) -> list[int]:
    """Up to `room` tokens that followed the latest earlier occurrence of `seq`'s last tokens, from its index in
    `indexes` (made on first use)."""
    index = indexes.setdefault(seq.seq_id, NgramIndex(config.prompt_lookup_min, config.prompt_lookup))
    return index.propose(seq.token_ids, room)


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
        self.rows_time: dict[int, float] = {}  # rows of a verify pass -> running mean seconds of its step

    def plan(self, out: SchedulerOutput, bm: BlockManager, max_model_len: int) -> dict[int, int]:
        """Draft lengths `{seq_id: k >= 0}` with KV slots reserved; empty (a plain step) unless some sequence
        found a draft worth verifying. Eligible sequences without one join the verify pass with k = 0."""
        decodes = [s for s in out.scheduled if s.sample and s.num_tokens == 1]
        self.proposals = {}
        if not decodes or len(decodes) > self.config.max_batch:
            return {}
        eligible = [s.seq for s in decodes if self.eligible(s.seq)]
        found = {}
        for seq in eligible:
            room = draft_room(self.config, seq, max_model_len)
            if room >= 1:
                draft = look_up(self.index, self.config, seq, room)
                if draft:
                    found[seq.seq_id] = draft
        ks = self.choose(found, len(decodes)) if found else {}
        for seq in eligible:
            k = ks.get(seq.seq_id, 0)
            if k and bm.can_allocate(seq, 1 + k):
                bm.allocate(seq, 1 + k)  # slots for [last token, d_1 .. d_k]
                self.proposals[seq.seq_id] = found[seq.seq_id][:k]
        if not self.proposals:
            return {}
        out.copy_ops.extend(bm.pop_copy_ops())
        return {seq.seq_id: len(self.proposals.get(seq.seq_id, ())) for seq in eligible}

    def choose(self, found: dict[int, list[int]], batch: int) -> dict[int, int]:
        """How many of each sequence's found tokens to verify. Adaptive: draft token j of a sequence with running
        acceptance a is kept with probability a^j, so verifying the step's r likeliest tokens (a prefix of
        each sequence's draft) adds their sum to the `batch` tokens a plain step makes, for r more rows in
        the pass; the r with the most tokens per second (`step_seconds`) is chosen where it beats a plain
        step by 5%. Rows are priced, not sequences: a verify pass of R rows costs what this machine was seen
        to take for R rows, so a batch drafts less as rows grow dear. A sequence kept from drafting while it
        had a draft probes with one token now and then (the wait doubles with each miss), as `draft_len` does."""
        if not self.config.adaptive:
            return {sid: len(d) for sid, d in found.items()}
        plain = self.step_seconds(batch, batch)
        if plain is None:
            return {}  # a plain step at this batch size first: its time is what drafting must beat
        odds = sorted(((self.acceptance.get(sid, self.engine_acceptance) ** j, sid)
                       for sid, d in found.items() for j in range(1, len(d) + 1)), key=lambda x: -x[0])
        best_r, best, tokens = 0, 1.05, float(batch)
        for r, (p, _) in enumerate(odds, 1):
            tokens += p
            speedup = tokens / batch * plain / self.step_seconds(batch, batch + r)
            if speedup > best:
                best_r, best = r, speedup
        ks: dict[int, int] = {}
        for _, sid in odds[:best_r]:
            ks[sid] = ks.get(sid, 0) + 1
        for sid in found:
            if ks.get(sid):
                continue
            waited = self.plain_steps.get(sid, 0) + 1
            self.plain_steps[sid] = waited
            wait = self.probe_wait.get(sid, self.config.probe_every)
            if waited >= wait:  # re-measure now and then: the text may have turned to copying
                self.plain_steps[sid] = 0
                self.probe_wait[sid] = min(8 * self.config.probe_every, 2 * wait)
                ks[sid] = 1
        return ks

    def step_seconds(self, batch: int, rows: int) -> float | None:
        """Seconds of a decode step of `batch` sequences running `rows` rows in one pass: measured where a step
        of so many rows ran, else the plain step's time plus the extra rows at the per-row price measured
        nearest this many rows (before any, `verify_cost` of a plain step per sequence); never below a plain
        step's. None until a plain step of `batch` sequences is timed."""
        plain = self.plain_time.get(batch)
        if plain is None or rows == batch:
            return plain
        if rows in self.rows_time:
            return max(self.rows_time[rows], plain)
        known = [(r, t) for r, t in self.rows_time.items() if r > batch]
        if known:
            r1, t1 = min(known, key=lambda rt: abs(rt[0] - rows))
            per_row = max(t1 - plain, 0.0) / (r1 - batch)
        else:
            per_row = self.config.verify_cost * plain / batch
        return plain + per_row * (rows - batch)

    def observe_step(self, seconds: float, out: SchedulerOutput, plan: dict[int, int]) -> None:
        """Time a pure decode step: a plain one by its batch size, a verify pass over every sequence of the step
        by its rows (a step that also ran a plain pass for ineligible sequences is no clean timing)."""
        batch = len(out.scheduled)
        if not plan:
            self.observe(seconds, batch, 0)
        elif len(plan) == batch:
            rows = sum(k + 1 for k in plan.values())
            prev = self.rows_time.get(rows)
            self.rows_time[rows] = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    def _draft(self, runner: ModelRunner, spec, plan):
        return {s.seq.seq_id: [s.seq.last_token_id] + self.proposals.get(s.seq.seq_id, []) for s in spec}, None

    def _verify(self, runner: ModelRunner, spec, plan, drafts, hidden) -> dict[int, list[int]]:
        return self._accept(spec, plan, drafts, verify_logits(self.model, runner, spec, plan, drafts)) if spec else {}

    def _accept_sampled(self, sid: int, drafts: list[int], p) -> list[int]:
        return accept_certain(drafts, p, self.generator_for(sid))

    def _record(self, seq_id: int, k: int, accepted: int) -> None:
        if k:  # a row without a draft is a plain decode row: nothing to learn
            super()._record(seq_id, k, accepted)
            self.stats.lookup_steps += 1

    def forget(self, seq_id: int) -> None:
        super().forget(seq_id)
        self.index.pop(seq_id, None)
