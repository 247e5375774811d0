"""Speculative decoding with a separate draft model (`--speculative draft --draft-model D`).

A smaller or cheaper model with the target's vocabulary (a pruned and distilled export, or an int4 copy
of the target) drafts `k` tokens greedily; one pass of the target over `[last token, d_1 .. d_k]`
verifies them (the same acceptance and adaptive draft length as `speculative.SelfSpeculator`, whose
policy this class inherits). The verify pass gives each token a decode row of its own (`verify_rows`),
so greedy output is the plain engine's, in bf16 too wherever both take the same kernels; sampled tokens
follow the target's distribution (the speculative-sampling rule).

Where the draft keeps a KV cache of its own, it is parallel to the target's: the same number of blocks
of the same size, addressed by the target's block ids, so it needs no block manager of its own (a block's
slots mean the same positions of the same sequence in both caches). What the draft has computed of each
sequence is tracked here, with the block ids it was written through: a sequence's first draft step
(or its first after a preemption moved its blocks) first runs the draft over the tokens it has not
seen, in the same call as its first draft token. After verification, the draft's KV stays valid up to
the last accepted token; the target's correction is fed to the draft at its next step.

A draft of the target's shape (its layers, KV heads, head size, rotary embedding: a quantized copy of it)
instead reads and writes the target's own cache (`draft_shares_kv`, on by default where it can be and the
cache is not int8): it drafts from the target's exact K/V of the context, needs no cache, prefill or
catch-up of its own, and the approximate K/V it writes at the drafted positions are overwritten by the
verify pass (every row's K/V is written before any row attends), so the target's cache ends as plain
decoding leaves it. An int8 cache is not shared: a draft's write could grow a block's scale and
re-round the target's entries in it.

Cost: a draft token's price is the draft's decode step timed against the target's when the engine starts
(`decode_step_seconds`), then the measured times of drafting steps. A draft cache takes memory beside the
target's (its layers x KV heads x head_dim per token), and plain decode steps do not run the draft, so a
sequence that speculates again after plain steps catches up first.
"""
from __future__ import annotations

import time

import torch

from ..layers.attention import AttentionMetadata
from ..layers.kv_quant import is_quantized
from ..models.cpu_decode import STACK_MAX_ROWS
from .model_runner import ModelRunner
from .speculative import SelfSpeculator, SpeculativeConfig, expected_tokens, verify_logits


def decode_step_seconds(models: list, block_size: int, reps: int = 3) -> list[float]:
    """Each model's fastest of `reps` one-token decode steps (its logits included), after a warm-up step,
    the models alternated so that each repetition sees the same moment's load: what a draft token costs
    on this machine, whatever makes it cheap (fewer layers, narrower ones, int4 weights)."""
    best = [float("inf")] * len(models)
    setups = []
    for m in models:
        caches = m.allocate_kv_cache(1, block_size, device=m.device)
        meta = AttentionMetadata.build([1], [1], [[0]], block_size, device=m.device)
        zero = torch.zeros(1, dtype=torch.long, device=m.device)  # token 0 at position 0
        setups.append((caches, meta, zero))
    sync = torch.cuda.synchronize if models[0].device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for rep in range(reps + 1):
            for i, (m, (caches, meta, zero)) in enumerate(zip(models, setups)):
                sync()
                start = time.perf_counter()
                m.compute_logits(m(zero, zero, caches, meta))
                sync()
                if rep:  # the first round warms up (kernels built, weights paged in)
                    best[i] = min(best[i], time.perf_counter() - start)
    return best


CATCH_UP_ROWS = 4  # a sequence's catch-up of at most this many tokens runs as decode rows (see `_draft`),
# where all of them together fit the fused decode stack (STACK_MAX_ROWS)


def can_share_kv(draft, model) -> bool:
    """Whether `draft`'s layers can read and write `model`'s KV cache as their own: the same number of layers,
    KV heads, head size, rotary embedding and dtype (a quantized copy of the model, say)."""
    a, b = draft.args, model.args
    if ((a.num_layers, a.num_kv_heads, a.head_dim, draft.dtype) != (b.num_layers, b.num_kv_heads, b.head_dim, model.dtype)):
        return False
    # The rotary frequencies themselves (a checkpoint may carry its own), not only the parameters they came from.
    ra, rb = getattr(draft, "rotary", None), getattr(model, "rotary", None)
    if ra is None or rb is None:
        return a.rope_parameters == b.rope_parameters
    return ra.inv_freq.shape == rb.inv_freq.shape and torch.equal(ra.inv_freq, rb.inv_freq)


class DraftSpeculator(SelfSpeculator):
    """Plans and runs draft-model speculative steps for an `LLMEngine` (see the module docstring)."""

    def __init__(self, model, config: SpeculativeConfig, runner: ModelRunner):
        from ..models import load_model

        if config.num_draft < 1:
            raise ValueError(f"num_draft must be at least 1, got {config.num_draft}")
        if config.draft_head is not None:
            raise ValueError("draft_head applies to self-speculation; a draft model drafts through its own head")
        draft = config.draft_model
        if not hasattr(draft, "allocate_kv_cache"):  # a transformers model: slimlm's serving model of it
            draft = load_model(draft, dtype=model.dtype)
            config.draft_model = draft  # the config keeps the serving form, so the transformers model can be freed
        draft = draft.eval()
        if draft.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) is not the target's "
                             f"({model.args.vocab_size}): a draft must share the target's tokenizer")
        if draft.device != model.device:
            raise ValueError(f"the draft model is on {draft.device}, the target on {model.device}")
        self._init_policy(model, config)
        self.draft = draft
        self.exit_layer = None
        # A draft token's cost relative to a target token, timed here: neither its parameters nor its layers
        # price it (a small model's decode step is mostly per-layer overhead; an int4 copy of the target
        # has all of its layers and parameters but reads a third of its bytes). Measured step times of
        # drafting steps then take over (`gain`).
        self.cost_fraction = 1.0  # unused where the draft length is fixed (adaptive off): no timing then
        if config.adaptive:
            target_s, draft_s = decode_step_seconds([model, draft], runner.block_size)
            self.cost_fraction = min(max(draft_s / target_s, 0.02), 4.0)
        self.block_size = runner.block_size
        self.shares_kv = config.draft_shares_kv
        int8_cache = is_quantized(runner.kv_caches[0][0])
        if self.shares_kv is None:
            self.shares_kv = can_share_kv(draft, model) and not int8_cache
        elif self.shares_kv and not can_share_kv(draft, model):
            raise ValueError("draft_shares_kv needs a draft with the target's layers, KV heads, head size, rotary "
                             "embedding and dtype (a quantized copy of it)")
        elif self.shares_kv and int8_cache:
            raise ValueError("draft_shares_kv needs a float KV cache: a draft's write into an int8 cache could grow "
                             "a block's scale and re-round the target's entries (use kv_cache_dtype='auto')")
        self.draft_caches = None if self.shares_kv else draft.allocate_kv_cache(runner.num_blocks, runner.block_size,
                                                                                device=runner.device)
        self.computed: dict[int, tuple[int, tuple[int, ...]]] = {}  # seq_id -> (positions, block ids they used)
        self.ran_draft: set[int] = set()  # the sequences the draft model ran on this step

    def model_speedup(self, acceptance: float, k: int) -> float:
        if k == 0:
            return 1.0
        cost = k * self.cost_fraction + 1 + self.config.verify_cost * k
        return expected_tokens(acceptance, k) / cost

    def _valid(self, seq) -> int:
        """Positions of `seq` whose draft KV is in the draft cache (0 if its blocks moved since)."""
        n, blocks = self.computed.get(seq.seq_id, (0, ()))
        return n if tuple(seq.block_table[:len(blocks)]) == blocks else 0

    def _draft(self, runner: ModelRunner, spec, plan):
        draft, dev, bs = self.draft, runner.device, runner.block_size
        self.ran_draft = {s.seq.seq_id for s in spec}
        tokens = {s.seq.seq_id: [s.seq.last_token_id] for s in spec}   # [last token, d_1, ...]
        # Step 0: every token the draft has not seen, the last one included, in one call per step: after a
        # verify step that is one or two tokens a sequence (the target's correction, or the last draft and
        # the bonus token), which run as decode rows of their own (as `verify_rows` does: the fused decode
        # stack instead of the prefill path, ~3x cheaper at batch 1); a longer catch-up runs as a prefill.
        ids, pos, q_lens, s_lens = [], [], [], []
        for s in spec:
            seq = s.seq
            n = seq.num_tokens
            start = n - 1 if self.shares_kv else min(self._valid(seq), n - 1)
            ids += seq.token_ids[start:n]
            pos += range(start, n)
            q_lens.append(n - start)
            s_lens.append(n)
        as_rows = max(q_lens, default=0) <= CATCH_UP_ROWS and len(ids) <= STACK_MAX_ROWS
        for j in range(max(plan.values(), default=0)):
            if j:
                batch = [s for s in spec if plan[s.seq.seq_id] > j]
                ids = [tokens[s.seq.seq_id][j] for s in batch]
                pos = [s.seq.num_tokens - 1 + j for s in batch]
                q_lens, s_lens = [1] * len(batch), [p + 1 for p in pos]
                tables = [s.seq.block_table for s in batch]
            else:
                batch = spec
                tables = [s.seq.block_table for s in batch]
                if as_rows:
                    tables = [t for t, q in zip(tables, q_lens) for _ in range(q)]
                    last = torch.tensor(q_lens, device=dev).cumsum(0) - 1
                    q_lens, s_lens = [1] * len(pos), [p + 1 for p in pos]
            meta = AttentionMetadata.build(q_lens, s_lens, tables, bs, device=dev)
            h = draft(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                      runner.kv_caches if self.shares_kv else self.draft_caches, meta)
            h = h[last] if j == 0 and as_rows else h[meta.last_token_indices]
            nxt = self._pick(draft.compute_logits(h), [s.seq for s in batch])
            for s, tok in zip(batch, nxt):
                tokens[s.seq.seq_id].append(tok)
        return tokens, None

    def _verify(self, runner: ModelRunner, spec, plan, drafts, hidden) -> dict[int, list[int]]:
        if not spec:
            return {}
        new_tokens = self._accept(spec, plan, drafts, verify_logits(self.model, runner, spec, plan, drafts))
        for s in spec if not self.shares_kv else ():
            if s.seq.seq_id not in self.ran_draft:
                continue  # its draft cache saw nothing this step; it catches up when it next drafts
            seq, k = s.seq, plan[s.seq.seq_id]
            accepted = len(new_tokens[seq.seq_id]) - 1
            # The draft wrote positions up to start + k - 1; they hold the final tokens up to the last accepted.
            valid = min(s.start + accepted + 1, s.start + k)
            self.computed[seq.seq_id] = (valid, tuple(seq.block_table[:-(-valid // self.block_size)]))
        return new_tokens

    def forget(self, seq_id: int) -> None:
        super().forget(seq_id)
        self.computed.pop(seq_id, None)
