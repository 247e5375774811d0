"""Prompt lookup and a draft model together (`--speculative draft --draft-model D --prompt-lookup N`).

Each step, a sequence whose last tokens occurred earlier in its own text may take what followed them as
its draft (`ngram_speculative`: no draft pass at all); the others draft with the draft model
(`draft_speculative`); one verify pass of the target takes them all, a sequence that drafts neither way
riding in it as its plain decode row. Where both could draft, the expected tokens per unit of work decide,
each from the sequence's own running acceptance of that kind of draft: a lookup draft costs its verify
rows, a model draft also its draft steps (the draft model's timed price). A sequence whose lookup drafts
missed drifts back toward the engine's lookup acceptance while it drafts otherwise, so it tries lookup
again once its text may have turned to copying.

Lossless as each is alone: greedy output is the plain engine's; sampled tokens follow the target's
distribution (lookup drafts by the certain-draft rule, `accept_certain`; model drafts by speculative
sampling with the draft's distribution). Steps that verified lookup drafts are not timed as the draft
model's steps (they cost less), so they do not make the draft model look cheap.
"""
from __future__ import annotations

from .block_manager import BlockManager
from .draft_speculative import DraftSpeculator
from .model_runner import ModelRunner
from .ngram_speculative import NgramIndex, accept_certain, draft_room, look_up
from .scheduler import SchedulerOutput
from .speculative import SpeculativeConfig, expected_tokens, step_acceptance


class HybridSpeculator(DraftSpeculator):
    """Plans and runs steps that draft by prompt lookup where the text repeats, with a draft model elsewhere."""

    def __init__(self, model, config: SpeculativeConfig, runner: ModelRunner):
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup:
            raise ValueError("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup, got "
                             f"{config.prompt_lookup_min} and {config.prompt_lookup}")
        if config.exit_confidence is not None:
            raise ValueError("exit_confidence needs each draft token's probability; prompt-lookup drafts have none")
        super().__init__(model, config, runner)
        self.index: dict[int, NgramIndex] = {}
        self.lookup: dict[int, list[int]] = {}  # seq_id -> this step's lookup draft
        self.lookup_acceptance: dict[int, float] = {}  # seq_id -> running acceptance of its lookup drafts
        self.lookup_prior = config.prior_acceptance  # the running rate over all sequences

    def plan(self, out: SchedulerOutput, bm: BlockManager, max_model_len: int) -> dict[int, int]:
        """Draft lengths `{seq_id: k >= 0}` for every eligible decoding sequence, with KV slots reserved (a
        lookup draft's in `self.lookup`); empty (a plain step) where none drafts."""
        decodes = [s for s in out.scheduled if s.sample and s.num_tokens == 1]
        self.lookup = {}
        if not decodes or len(decodes) > self.config.max_batch:
            return {}
        eligible = [s.seq for s in decodes if self.eligible(s.seq)]
        plan = {}
        for seq in eligible:
            room = draft_room(self.config, seq, max_model_len)
            if room < 1:
                continue
            found = look_up(self.index, self.config, seq, room)
            k = min(self.draft_len(seq, len(decodes)), room)
            if found and self._lookup_pays(seq.seq_id, found, k, len(decodes)):
                self.lookup[seq.seq_id], k = found, len(found)
            if k and bm.can_allocate(seq, 1 + k):
                bm.allocate(seq, 1 + k)  # slots for [last token, d_1 .. d_k]
                plan[seq.seq_id] = k
            else:
                self.lookup.pop(seq.seq_id, None)
        if not plan:
            return {}
        out.copy_ops.extend(bm.pop_copy_ops())
        return {seq.seq_id: plan.get(seq.seq_id, 0) for seq in eligible}

    def _lookup_pays(self, sid: int, found: list[int], k_model: int, batch: int) -> bool:
        """Whether the lookup draft `found` is expected to make more tokens per unit of work than drafting
        `k_model` with the draft model (0: a plain row). Fixed drafting (adaptive off) always takes it."""
        if not self.config.adaptive:
            return True
        a = self.lookup_acceptance.get(sid, self.lookup_prior)
        lookup = expected_tokens(a, len(found)) / (1 + self.config.verify_cost * len(found))
        model = self.gain(self.acceptance.get(sid, self.engine_acceptance), k_model, batch) if k_model else 1.0
        if lookup >= max(model, 1.05):
            return True
        if sid in self.lookup_acceptance:  # drift back: the text may turn to copying
            self.lookup_acceptance[sid] = a + 0.05 * (self.lookup_prior - a)
        return False

    def _draft(self, runner: ModelRunner, spec, plan):
        by_model = [s for s in spec if plan[s.seq.seq_id] and s.seq.seq_id not in self.lookup]
        tokens, _ = super()._draft(runner, by_model, {s.seq.seq_id: plan[s.seq.seq_id] for s in by_model})
        for s in spec:
            sid = s.seq.seq_id
            if sid not in tokens:
                tokens[sid] = [s.seq.last_token_id] + self.lookup.get(sid, [])
        return tokens, None

    def _accept_sampled(self, sid: int, drafts: list[int], p) -> list[int]:
        if sid in self.lookup or not drafts:  # a lookup draft, or a plain row
            return accept_certain(drafts, p, self.generator_for(sid))
        return super()._accept_sampled(sid, drafts, p)

    def _record(self, seq_id: int, k: int, accepted: int) -> None:
        if not k:
            return  # a plain decode row: nothing to learn
        if seq_id not in self.lookup:
            super()._record(seq_id, k, accepted)
            return
        self._count(seq_id, k, accepted)
        self.stats.lookup_steps += 1
        rate, prev = step_acceptance(k, accepted), self.lookup_acceptance.get(seq_id, self.lookup_prior)
        self.lookup_prior = 0.9 * self.lookup_prior + 0.1 * rate
        self.lookup_acceptance[seq_id] = 0.7 * prev + 0.3 * rate

    def observe_step(self, seconds: float, out: SchedulerOutput, plan: dict[int, int]) -> None:
        if not self.lookup:  # a step that verified lookup drafts is no price of the draft model's
            super().observe_step(seconds, out, plan)

    def forget(self, seq_id: int) -> None:
        super().forget(seq_id)
        self.index.pop(seq_id, None)
        self.lookup_acceptance.pop(seq_id, None)
