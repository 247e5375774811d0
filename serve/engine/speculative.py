"""Self-speculative decoding inside continuous batching: draft with the first E layers, verify with the rest.

Per step, each decoding sequence chosen to speculate drafts `k` tokens greedily with layers `[0, E)`
and an exit head (the model's final norm, or an exit norm of its own, then the shared LM head), then
one pass of layers `[E, L)` over `[last token, d_1 .. d_k]` verifies them all: the draft already wrote
those tokens' KV for layers `< E` and kept their layer-E hidden states, so nothing is computed twice.
Accepted drafts plus the target's next token are appended; the KV of rejected drafts stays behind the
sequence's computed length, is overwritten later, and blocks holding only rejected slots go back to
the pool. Greedy requests: the accepted tokens are the target model's own argmaxes, so the output is
the plain engine's (the verify pass computes each token as its own decode row, see `verify_rows`, so
even in bf16 the rows round as one-token steps do wherever both take the same kernels). Sampled
requests: drafts are sampled from the draft's distribution and kept by the speculative-sampling rule
(`_accept`), so tokens follow the target's distribution. Requests with logprobs or penalties decode
plainly, and so do seeded sampled requests: whether a step drafts, and how much, changes how many numbers
the request's generator draws, and it follows timings and the rest of the batch even with fixed drafting
(the batch limit, free KV blocks), so a seed gives the plain engine's text.

Aimed at never being slower than plain decoding (check with `slimlm bench --speculative self`; with
untrained exits it measured 0.95x, see docs/benchmarks.md): each sequence keeps a running acceptance
rate `a` and drafts the `k` that maximises expected tokens per unit of work, `(1 - a^(k+1)) / (1 - a)`
over the cost of a step - this machine's measured step times once known, before that the model
`(k + 1) * E/L + (1 - E/L) * (1 + verify_cost * k)`; where no `k` pays it decodes plainly and re-probes
with one draft after a wait that doubles with each miss. In a batch, a step drafts only where every
sequence in it would (a mixed step runs its plain rows as a pass of their own). A batch larger than
`max_batch` never speculates: there decoding is compute-bound and drafts cost full price.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.attention import AttentionMetadata
from ..layers.norm import RMSNorm
from ..layers.sampler import argmax_rows, filter_logits
from .block_manager import BlockManager
from .model_runner import ModelRunner, StepLogits
from .scheduler import SchedulerOutput
from .sequence import Sequence


@dataclass
class SpeculativeConfig:
    """`exit_layer` E: layers run by the draft (1 <= E < num_layers). `num_draft`: most tokens drafted
    per step. `exit_norm`: the exit's own RMSNorm weight [hidden] (None: the model's final norm).
    `exit_proj`: a lens exit's `(weight [hidden, hidden], bias [hidden])`: the draft's head reads
    `n + n @ weight.T + bias` with n = norm(h) (None: n).
    `adaptive` False drafts exactly `num_draft` tokens every step (for measuring acceptance).
    `draft_model`: draft with this smaller model of the same vocabulary instead of the first E layers."""

    exit_layer: int = 0
    num_draft: int = 4
    exit_norm: Tensor | None = None
    exit_proj: tuple[Tensor, Tensor] | None = None
    adaptive: bool = True
    verify_cost: float = 0.15  # extra cost of each verified token, relative to a one-token pass
    max_batch: int = 16
    prior_acceptance: float = 0.6
    probe_every: int = 16
    draft_model: object | None = None  # a transformers model or slimlm CausalLM: draft with it (draft_speculative.py)
    # The draft reads and writes the target's KV cache instead of keeping its own (no draft cache, no catch-up
    # of tokens it has not seen). None: where it can (`draft_speculative.can_share_kv`) and the cache is
    # not int8; True: required; False: never.
    draft_shares_kv: bool | None = None
    # Lossy, opt-in (CALM-style confidence exit): a greedy draft token whose draft probability is at least
    # this is kept even where the full model's argmax differs. None: lossless.
    exit_confidence: float | None = None
    # "int8" | "int4": the draft's logits through an RTN copy of the LM head (lossless: the verify pass keeps
    # the model's own head). In a small model the head costs a draft token as much as several layers.
    draft_head: str | None = None
    # Prompt lookup (ngram_speculative.py): draft the tokens that followed the latest earlier occurrence of the
    # sequence's last n tokens in its own text, n from `prompt_lookup` down to `prompt_lookup_min`. 0: off.
    prompt_lookup: int = 0
    prompt_lookup_min: int = 2


@dataclass
class SpecStats:
    """Counters for /metrics and the benchmark: drafted and accepted tokens, speculative steps."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    lookup_steps: int = 0  # of `steps`: those whose draft came from prompt lookup
    by_draft_len: dict[int, list[int]] = field(default_factory=dict)  # k -> [steps, accepted]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per speculative step per sequence (accepted drafts + the target's token)."""
        return self.emitted / self.steps if self.steps else 0.0


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one step emits on average with `k` drafts each accepted with probability `acceptance`
    (the accepted run plus the target's own token)."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def expected_speedup(acceptance: float, k: int, layer_fraction: float, verify_cost: float) -> float:
    """Tokens per unit of work of drafting `k` tokens, relative to plain decoding (1.0)."""
    if k == 0:
        return 1.0
    cost = (k + 1) * layer_fraction + (1 - layer_fraction) * (1 + verify_cost * k)
    return expected_tokens(acceptance, k) / cost


def step_acceptance(k: int, accepted: int) -> float:
    """Acceptance per drafted token, from one step: a run of `accepted` of `k`, then (maybe) a miss."""
    return accepted / k if accepted == k else accepted / (accepted + 1)


def _probs(logits: Tensor, params: list) -> Tensor:
    """The sampling distribution each row's request draws from: its temperature, top-k, top-p, min-p."""
    probs = torch.nan_to_num(filter_logits(logits.float(), params).softmax(-1), nan=0.0, posinf=0.0, neginf=0.0)
    dead = (probs.sum(-1) <= 0).nonzero()[:, 0]
    if len(dead):  # no valid probability left (inf/NaN logits): the argmax, as plain sampling falls back to
        probs[dead] = 0
        probs[dead, logits[dead].argmax(-1)] = 1
    return probs


def verify_rows(spec, plan: dict[int, int], runner: ModelRunner) -> tuple[Tensor, AttentionMetadata]:
    """Positions [N] and attention metadata of a verify pass over each planned sequence's
    `[last token, d_1 .. d_k]`, one decode row per token (the sequence's block table, its own length).

    The step writes every row's KV, in row order, before any row attends, so row j sees the tokens before
    it as a causal pass would, and an int8 cache takes them one by one as successive decode steps would; but the
    rows of drafts that are then rejected were written too, and can have grown their int8 block's scale and
    re-rounded the entries before them, which plain decoding never does: with an int8 cache, speculation is
    not exact (greedy output can differ from plain int8 decoding's).
    Each row is computed as a one-token step computes it (the same rounding, so greedy bf16 output equals
    plain decoding's wherever both take the same kernels), and a few rows run in the fused C decode stack
    instead of layer by layer."""
    dev = runner.device
    positions = [p for s in spec for p in range(s.start, s.start + plan[s.seq.seq_id] + 1)]
    tables = [s.seq.block_table for s in spec for _ in range(plan[s.seq.seq_id] + 1)]
    meta = AttentionMetadata.build([1] * len(positions), [p + 1 for p in positions], tables, runner.block_size,
                                   device=dev)
    return torch.tensor(positions, dtype=torch.long, device=dev), meta


def verify_logits(model, runner: ModelRunner, spec, plan: dict[int, int], drafts: dict[int, list[int]]) -> Tensor:
    """The whole model's logits [N, V] over each planned sequence's `[last token, d_1 .. d_k]` (`verify_rows`),
    for a draft that kept no hidden states to resume from (a draft model, prompt lookup)."""
    ids = [t for s in spec for t in drafts[s.seq.seq_id][:plan[s.seq.seq_id] + 1]]
    pos, meta = verify_rows(spec, plan, runner)
    x = model(torch.tensor(ids, dtype=torch.long, device=runner.device), pos, runner.kv_caches, meta)
    return model.compute_logits(x)


class SelfSpeculator:
    """Plans and runs speculative steps for an `LLMEngine` (see the module docstring)."""

    def __init__(self, model, config: SpeculativeConfig):
        num_layers = len(model.layers)
        if not 1 <= config.exit_layer < num_layers:
            raise ValueError(f"exit_layer must be in 1..{num_layers - 1} (the model has {num_layers} layers), "
                             f"got {config.exit_layer}")
        if config.num_draft < 1:
            raise ValueError(f"num_draft must be at least 1, got {config.num_draft}")
        self.exit_layer = config.exit_layer
        self.layer_fraction = config.exit_layer / num_layers
        if config.exit_norm is None:
            self.norm = model.norm
        else:
            weight = config.exit_norm.to(model.dtype).to(model.device)
            if weight.shape != model.norm.weight.shape:
                raise ValueError(f"exit_norm has shape {tuple(weight.shape)}, expected {tuple(model.norm.weight.shape)}")
            self.norm = RMSNorm(weight, model.args.rms_norm_eps)
        self.proj = None
        if config.exit_proj is not None:
            weight, bias = (t.to(model.dtype).to(model.device) for t in config.exit_proj)
            d = model.norm.weight.numel()
            if weight.shape != (d, d) or bias.shape != (d,):
                raise ValueError(f"exit_proj has shapes {tuple(weight.shape)} and {tuple(bias.shape)}, "
                                 f"expected ({d}, {d}) and ({d},)")
            self.proj = (weight, bias)
        self.draft_head = None
        if config.draft_head is not None:
            from ..models.quant_head import quantized_head

            self.draft_head = quantized_head(model, config.draft_head)
        self._init_policy(model, config)

    def _init_policy(self, model, config: SpeculativeConfig) -> None:
        self.model, self.config = model, config
        self.acceptance: dict[int, float] = {}  # seq_id -> running acceptance rate
        self.plain_steps: dict[int, int] = {}  # seq_id -> plain steps since its last speculation
        self.probe_wait: dict[int, int] = {}  # seq_id -> plain steps before its next probe (doubles per miss)
        self.engine_acceptance = config.prior_acceptance  # running rate over all sequences: a new one's prior
        self.plain_time: dict[int, float] = {}  # batch size -> running mean seconds of a plain decode step
        self.spec_time: dict[tuple[int, int], float] = {}  # (batch size, k) -> the same for a speculative step
        self.stats = SpecStats()
        self.generator_for = lambda seq_id: None  # the engine sets it: a request's torch.Generator (its seed)
        self._q: dict[int, list[Tensor]] = {}  # seq_id -> the draft's distribution at each sampled draft
        self._conf: dict[int, list[float]] = {}  # seq_id -> the draft's probability of each greedy draft (exit_confidence)
        self._unsettled: dict[int, tuple[int, int]] = {}  # seq_id -> (drafts, accepted) of this step, until `settle`

    # -- planning -----------------------------------------------------------------------------
    def eligible(self, seq: Sequence) -> bool:
        """Greedy and sampled requests speculate; those that ask for logprobs or penalties decode plainly, and so
        do seeded sampled ones: whether and how far a step drafts follows this machine's timings and the rest
        of the batch (adaptive or not: the batch limit, free KV blocks), and each changes how many numbers the
        request's generator draws, so the same seed would give other text from run to run (plainly decoded, a
        seed gives the plain engine's text).
        A sequence's first token always comes from its prompt's logits (the engine forks n > 1 there)."""
        p = seq.params
        if p is not None and p.seed is not None and not p.greedy:
            return False
        return seq.num_output_tokens > 0 and (p is None or (p.logprobs is None and not p.needs_penalties))

    def gain(self, acceptance: float, k: int, batch: int) -> float:
        """Expected speedup of drafting k: the cost model's, and once step times at this batch size are
        measured (this machine's real cost of a draft + verify step), the smaller of the two; where only
        the speculative step is timed, none (one plain step then times the other side). Both must
        see a gain: a noisy timing alone (a plain step that happened to be slow) never turns drafting on
        where drafts miss, since the cost model prices a step's extra work at more than nothing."""
        model = self.model_speedup(acceptance, k)
        plain, spec = self.plain_time.get(batch), self.spec_time.get((batch, k))
        if plain is None and any(b == batch for b, _ in self.spec_time):
            return 0.0  # drafting at this batch size was timed, a plain step not yet: decode plainly to time one
        if plain is None or spec is None:
            return model
        return min(model, expected_tokens(acceptance, k) * plain / spec)

    def model_speedup(self, acceptance: float, k: int) -> float:
        """The cost model's speedup of drafting k, before step times are measured."""
        return expected_speedup(acceptance, k, self.layer_fraction, self.config.verify_cost)

    def observe(self, seconds: float, batch: int, k: int) -> None:
        """Record the wall time of a decode step of `batch` sequences that drafted `k` tokens each (0: plain)."""
        table, key = (self.plain_time, batch) if k == 0 else (self.spec_time, (batch, k))
        prev = table.get(key)
        table[key] = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    def observe_step(self, seconds: float, out: SchedulerOutput, plan: dict[int, int]) -> None:
        """Time a pure decode step; only one where every sequence drafted the same k is a clean timing."""
        ks = {plan.get(s.seq.seq_id, 0) for s in out.scheduled}
        if len(ks) == 1:
            self.observe(seconds, len(out.scheduled), ks.pop())

    def draft_len(self, seq: Sequence, batch: int = 1) -> int:
        c = self.config
        room = min(seq.max_tokens - seq.num_output_tokens, c.num_draft + 1) - 1  # the target adds one token
        if room <= 0:
            return 0
        if not c.adaptive:
            return room
        a = self.acceptance.get(seq.seq_id, self.engine_acceptance)
        best_k, best = 0, 1.05  # speculate only where it is expected to pay by a margin
        could_pay = False
        for k in range(1, room + 1):
            gain = self.gain(a, k, batch)
            could_pay = could_pay or self.gain(1.0, k, batch) > best
            if gain > best:
                best_k, best = k, gain
        if best_k == 0 and could_pay:  # (where even perfect drafts cannot pay, never probe)
            waited = self.plain_steps.get(seq.seq_id, 0) + 1
            self.plain_steps[seq.seq_id] = waited
            wait = self.probe_wait.get(seq.seq_id, c.probe_every)
            if waited >= wait:  # re-measure now and then: the text may have become easy
                self.plain_steps[seq.seq_id] = 0
                self.probe_wait[seq.seq_id] = min(8 * c.probe_every, 2 * wait)  # a miss doubles the wait
                return 1
        return best_k

    def plan(self, out: SchedulerOutput, bm: BlockManager, max_model_len: int) -> dict[int, int]:
        """Draft lengths `{seq_id: k >= 1}` for this step's decoding sequences, with KV slots reserved."""
        decodes = [s for s in out.scheduled if s.sample and s.num_tokens == 1]
        if not decodes or len(decodes) > self.config.max_batch:
            return {}
        plan = {}
        for s in decodes:
            seq = s.seq
            k = min(self.draft_len(seq, len(decodes)), max_model_len - seq.num_tokens - 1) if self.eligible(seq) else 0
            if k >= 1 and bm.can_allocate(seq, 1 + k):
                bm.allocate(seq, 1 + k)  # slots for [last token, d_1 .. d_k]
                plan[seq.seq_id] = k
        if self.config.adaptive and len(decodes) > 1 and len(plan) < len(decodes):
            # A step that mixes plain and drafting sequences runs the plain ones as a pass of their own, so it
            # costs about a plain step more than either kind: in a batch, all draft or none does (adaptive).
            for s in decodes:
                if s.seq.seq_id in plan:
                    bm.trim(s.seq)  # the look-ahead slots go back; the last token's stays
            plan = {}
        out.copy_ops.extend(bm.pop_copy_ops())
        return plan

    # -- running ------------------------------------------------------------------------------
    def _pick(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        """The draft's tokens for `logits` [B, V]: the argmax for greedy requests; for sampled ones a sample
        from the draft's filtered distribution q (kept for the acceptance test)."""
        tokens = argmax_rows(logits)
        if self.config.exit_confidence is not None:
            top = torch.softmax(logits.float(), dim=-1).amax(-1).tolist()
            for seq, p in zip(seqs, top):
                self._conf.setdefault(seq.seq_id, []).append(p)
        sampled = [i for i, seq in enumerate(seqs) if seq.params is not None and not seq.params.greedy]
        if sampled:
            q = _probs(logits[sampled], [seqs[i].params for i in sampled])
            for j, i in enumerate(sampled):
                sid = seqs[i].seq_id
                if q[j].sum() > 0:
                    tokens[i] = torch.multinomial(q[j], 1, generator=self.generator_for(sid)).item()
                self._q.setdefault(sid, []).append(q[j])
        return tokens

    def exit_logits(self, hidden: Tensor) -> Tensor:
        head = self.model.lm_head if self.draft_head is None else self.draft_head
        normed = self.norm(hidden)
        if self.proj is not None:
            normed = normed + F.linear(normed, *self.proj)
        return head(normed)

    @torch.inference_mode()
    def execute(self, runner: ModelRunner, out: SchedulerOutput, plan: dict[int, int],
                prompt_logits_for: set[int]) -> tuple[StepLogits, dict[int, list[int]]]:
        """Run the step: plain rows through `runner`, planned sequences by draft + verify.

        Returns the plain rows' logits (to sample as usual) and each planned sequence's new tokens.
        """
        runner.copy_blocks(out.copy_ops)
        plain = [s for s in out.scheduled if s.seq.seq_id not in plan]
        spec = [s for s in out.scheduled if s.seq.seq_id in plan]
        logits = StepLogits([], None, {})
        if plain:
            logits = runner.execute(SchedulerOutput(scheduled=plain), prompt_logits_for)
        drafts, hidden = self._draft(runner, spec, plan)
        return logits, self._verify(runner, spec, plan, drafts, hidden)

    def _draft(self, runner: ModelRunner, spec, plan) -> tuple[dict[int, list[int]], dict[int, list[Tensor]]]:
        model, dev, bs = self.model, runner.device, runner.block_size
        tokens = {s.seq.seq_id: [s.seq.last_token_id] for s in spec}   # [last token, d_1, ...]
        hidden: dict[int, list[Tensor]] = {s.seq.seq_id: [] for s in spec}  # layer-E states, one per token
        for j in range(max(plan.values(), default=-1) + 1):
            batch = [s for s in spec if plan[s.seq.seq_id] >= j]
            ids = torch.tensor([tokens[s.seq.seq_id][j] for s in batch], dtype=torch.long, device=dev)
            pos = torch.tensor([s.start + j for s in batch], dtype=torch.long, device=dev)
            meta = AttentionMetadata.build([1] * len(batch), [s.start + j + 1 for s in batch],
                                           [s.seq.block_table for s in batch], bs, device=dev)
            h = model(ids, pos, runner.kv_caches, meta, num_layers=self.exit_layer)  # [B, hidden]
            drafting = [i for i, s in enumerate(batch) if j < plan[s.seq.seq_id]]
            next_ids = self._pick(self.exit_logits(h[drafting]), [batch[i].seq for i in drafting]) if drafting else []
            for i, s in enumerate(batch):
                hidden[s.seq.seq_id].append(h[i])
            for i, tok in zip(drafting, next_ids):
                tokens[batch[i].seq.seq_id].append(tok)
        return tokens, hidden

    def _verify(self, runner: ModelRunner, spec, plan, drafts, hidden) -> dict[int, list[int]]:
        if not spec:
            return {}
        model = self.model
        x = torch.stack([h for s in spec for h in hidden[s.seq.seq_id]])            # [N, hidden]
        pos, meta = verify_rows(spec, plan, runner)
        x = model.run_layers(x, pos, runner.kv_caches, meta, self.exit_layer, len(model.layers))
        return self._accept(spec, plan, drafts, model.compute_logits(x))

    def _accept(self, spec, plan, drafts, logits: Tensor) -> dict[int, list[int]]:
        """Each sequence's new tokens from the target's `logits` [N, V] (k + 1 rows per sequence, in `spec`
        order). Greedy: its drafts up to the first that differs from the target's argmax, then the target's
        argmax there (with `exit_confidence`, lossy: a differing draft whose draft probability reaches it is
        kept too). Sampled (speculative sampling): draft d_i, drawn from q_i, is kept with probability
        min(1, p_i(d_i) / q_i(d_i)); the first one rejected is replaced by a sample of max(p_i - q_i, 0)
        (renormalised), and when all k are kept one more token is sampled from p_(k+1). The tokens are then
        distributed exactly as the target's own sampling would give (Leviathan et al. 2023; Chen et al. 2023)."""
        target = argmax_rows(logits)
        new_tokens, row = {}, 0
        for s in spec:
            sid, k = s.seq.seq_id, plan[s.seq.seq_id]
            d = drafts[sid]
            params = s.seq.params
            sure = self._conf.pop(sid, [])
            if params is None or params.greedy:
                g = target[row:row + k + 1]
                keep = self.config.exit_confidence
                a = 0
                while a < k and (d[a + 1] == g[a] or (keep is not None and sure[a] >= keep)):
                    a += 1
                new_tokens[sid] = d[1:a + 1] + [g[a]]
            else:
                new_tokens[sid] = self._accept_sampled(sid, d[1:k + 1], _probs(logits[row:row + k + 1], [params] * (k + 1)))
                a = len(new_tokens[sid]) - 1
            self._record(sid, k, a)
            row += k + 1
        return new_tokens

    def _accept_sampled(self, sid: int, drafts: list[int], p: Tensor) -> list[int]:
        q = self._q.pop(sid)
        gen = self.generator_for(sid)
        out = []
        for i, tok in enumerate(drafts):
            if torch.rand((), generator=gen).item() * q[i][tok].item() < p[i][tok].item():  # u < p / q
                out.append(tok)
                continue
            residual = (p[i] - q[i]).clamp_(min=0)
            dist = residual if residual.sum() > 0 else p[i]
            out.append(torch.multinomial(dist, 1, generator=gen).item())
            return out
        return out + [torch.multinomial(p[len(drafts)], 1, generator=gen).item()]

    def _count(self, seq_id: int, k: int, accepted: int) -> None:
        """Hold the step's counts until `settle` knows how many of its tokens the output kept."""
        self._unsettled[seq_id] = (k, accepted)

    def settle(self, seq_id: int, kept: int) -> None:
        """Count a sequence's speculative step once the engine has appended its tokens: `kept` of the accepted
        drafts and the target's token, the rest cut at an EOS, a stop token or string, or a length limit. The
        counters say what reached the output (a draft accepted past a stop counts as drafted, not accepted);
        the adaptive policy learned from the whole accepted run in `_record`."""
        if seq_id not in self._unsettled:
            return
        k, accepted = self._unsettled.pop(seq_id)
        accepted, emitted = min(accepted, kept), min(accepted + 1, kept)
        st = self.stats
        st.steps += 1
        st.drafted += k
        st.accepted += accepted
        st.emitted += emitted
        cell = st.by_draft_len.setdefault(k, [0, 0])
        cell[0] += 1
        cell[1] += accepted

    def _record(self, seq_id: int, k: int, accepted: int) -> None:
        self._count(seq_id, k, accepted)
        rate = step_acceptance(k, accepted)
        prev = self.acceptance.get(seq_id, self.engine_acceptance)
        self.engine_acceptance = 0.9 * self.engine_acceptance + 0.1 * rate
        if accepted:
            self.probe_wait.pop(seq_id, None)  # drafts land again: probe at the base rate
        self.acceptance[seq_id] = 0.7 * prev + 0.3 * rate
        self.plain_steps[seq_id] = 0

    def after_update(self, plan: dict[int, int], seqs: list[Sequence], bm: BlockManager) -> None:
        """After `Scheduler.update`: accepted drafts' KV is valid in every layer, so all but the newest token
        count as computed; blocks that only rejected drafts touched go back to the pool."""
        for seq in seqs:
            if seq.is_finished:
                self.forget(seq.seq_id)
                continue
            if seq.seq_id not in plan:
                continue
            seq.num_computed_tokens = seq.num_tokens - 1
            bm.register_full_blocks(seq)
            bm.trim(seq)

    def forget(self, seq_id: int) -> None:
        self._q.pop(seq_id, None)  # (not `_unsettled`: `after_update` forgets a finished sequence before `settle`)
        self._conf.pop(seq_id, None)
        self.acceptance.pop(seq_id, None)
        self.plain_steps.pop(seq_id, None)
        self.probe_wait.pop(seq_id, None)

