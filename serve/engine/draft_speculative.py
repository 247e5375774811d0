"""Speculative decoding with a separate draft model (`--speculative draft --draft-model D`).

A smaller model with the target's vocabulary (a pruned and distilled export, say) drafts `k` tokens
greedily; one pass of the target over `[last token, d_1 .. d_k]` verifies them (the same acceptance
and adaptive draft length as `speculative.SelfSpeculator`, whose policy this class inherits): greedy
output is the plain engine's (up to the rounding of a multi-token pass against a one-token pass), and
sampled tokens follow the target's distribution (the speculative-sampling rule).

The draft keeps a KV cache of its own, parallel to the target's: the same number of blocks of the same
size, addressed by the target's block ids, so it needs no block manager of its own (a block's slots
mean the same positions of the same sequence in both caches). What the draft has computed of each
sequence is tracked here, with the block ids it was written through: a sequence's first draft step
(or its first after a preemption moved its blocks) first runs the draft over the tokens it has not
seen, in the same call as its first draft token. After verification, the draft's KV stays valid up to
the last accepted token; the target's correction is fed to the draft at its next step.

Cost: the draft's KV cache takes memory beside the target's (its layers x KV heads x head_dim per
token), and plain decode steps do not run the draft, so a sequence that speculates again after plain
steps catches up first.
"""
from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata
from .model_runner import ModelRunner
from .speculative import SelfSpeculator, SpeculativeConfig, expected_tokens, verify_rows


def _weights_read(args) -> int:
    """Weights one decode token multiplies (decoder projections and the LM head): its cost at small batch."""
    attn = args.hidden_size * args.head_dim * (2 * args.num_heads + 2 * args.num_kv_heads)
    return args.num_layers * (attn + 3 * args.hidden_size * args.intermediate_size) + args.hidden_size * args.vocab_size


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
        draft = draft.eval()
        if draft.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) is not the target's "
                             f"({model.args.vocab_size}): a draft must share the target's tokenizer")
        if draft.device != model.device:
            raise ValueError(f"the draft model is on {draft.device}, the target on {model.device}")
        self._init_policy(model, config)
        self.draft = draft
        self.exit_layer = None
        # A draft token's cost relative to a target token: the weights it reads, or for small models (where a
        # decode step is mostly per-layer overhead) its share of the layers, whichever is larger.
        self.cost_fraction = max(_weights_read(draft.args) / _weights_read(model.args),
                                 draft.args.num_layers / model.args.num_layers)
        self.block_size = runner.block_size
        self.draft_caches = draft.allocate_kv_cache(runner.num_blocks, runner.block_size, device=runner.device)
        self.computed: dict[int, tuple[int, tuple[int, ...]]] = {}  # seq_id -> (positions, block ids they used)

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
        tokens = {s.seq.seq_id: [s.seq.last_token_id] for s in spec}   # [last token, d_1, ...]
        # Step 0: every token the draft has not seen, the last one included, in one call per step.
        ids, pos, q_lens, s_lens = [], [], [], []
        for s in spec:
            seq = s.seq
            n = seq.num_tokens
            start = min(self._valid(seq), n - 1)
            ids += seq.token_ids[start:n]
            pos += range(start, n)
            q_lens.append(n - start)
            s_lens.append(n)
        for j in range(max(plan.values(), default=0)):
            if j:
                batch = [s for s in spec if plan[s.seq.seq_id] > j]
                ids = [tokens[s.seq.seq_id][j] for s in batch]
                pos = [s.seq.num_tokens - 1 + j for s in batch]
                q_lens, s_lens = [1] * len(batch), [p + 1 for p in pos]
            else:
                batch = spec
            meta = AttentionMetadata.build(q_lens, s_lens, [s.seq.block_table for s in batch], bs, device=dev)
            h = draft(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                      self.draft_caches, meta)
            nxt = self._pick(draft.compute_logits(h[meta.last_token_indices]), [s.seq for s in batch])
            for s, tok in zip(batch, nxt):
                tokens[s.seq.seq_id].append(tok)
        return tokens, None

    def _verify(self, runner: ModelRunner, spec, plan, drafts, hidden) -> dict[int, list[int]]:
        if not spec:
            return {}
        model = self.model
        ids = [t for s in spec for t in drafts[s.seq.seq_id][:plan[s.seq.seq_id] + 1]]
        pos, meta = verify_rows(spec, plan, runner)
        x = model(torch.tensor(ids, dtype=torch.long, device=runner.device), pos, runner.kv_caches, meta)
        new_tokens = self._accept(spec, plan, drafts, model.compute_logits(x))
        for s in spec:
            seq, k = s.seq, plan[s.seq.seq_id]
            accepted = len(new_tokens[seq.seq_id]) - 1
            # The draft wrote positions up to start + k - 1; they hold the final tokens up to the last accepted.
            valid = min(s.start + accepted + 1, s.start + k)
            self.computed[seq.seq_id] = (valid, tuple(seq.block_table[:-(-valid // self.block_size)]))
        return new_tokens

    def forget(self, seq_id: int) -> None:
        super().forget(seq_id)
        self.computed.pop(seq_id, None)
