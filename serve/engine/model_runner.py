"""Runs one scheduled step on the model: gathers inputs, executes copy-on-write, returns logits.

The runner owns the paged KV cache tensors (one (k, v) pair per layer, `[num_blocks, block_size,
KVH, D]`, in the model dtype or in int8 with per-block scales) and turns a `SchedulerOutput` into
the flattened batch the model code expects. It returns logits only for the rows that are sampled
(the last token of each sequence that finished its prompt) plus, for sequences that asked for
prompt logprobs, every row of their chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.attention import AttentionMetadata
from ..layers.kv_quant import cache_nbytes, copy_blocks_
from .cuda_graph import DecodeGraphs
from .scheduler import SchedulerOutput


@dataclass
class StepLogits:
    """`sample[i]` are the logits of `sampled_ids[i]`'s next token; `prompt[seq_id]` = ([T, V], first position)."""

    sampled_ids: list[int]
    sample: Tensor | None
    prompt: dict[int, tuple[Tensor, int]]


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None,
                 graph_batch: int = 0, max_model_len: int | None = None):
        """`kv_dtype`: the cache's dtype (None: the model's; torch.int8: quantized, see `kv_quant`).
        `graph_batch` > 0: decode steps of up to that many sequences (and contexts up to `max_model_len`)
        replay CUDA graphs (`cuda_graph.py`; eager padded steps on a CPU); the cache gets one scratch
        block past `num_blocks` for the graphs' padding rows."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        extra = 1 if graph_batch else 0
        self.kv_caches = model.allocate_kv_cache(num_blocks + extra, block_size, dtype=kv_dtype, device=self.device)
        self.graphs = None
        if graph_batch:
            if max_model_len is None:
                raise ValueError("graph_batch needs max_model_len (the width of the graphs' block tables)")
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, max_model_len, graph_batch,
                                       scratch_block=num_blocks)

    def kv_cache_bytes(self) -> int:
        return sum(cache_nbytes(k) + cache_nbytes(v) for k, v in self.kv_caches)

    @torch.inference_mode()
    def copy_blocks(self, copy_ops: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block src into dst in every layer (int8 scales too), before the step writes."""
        if not copy_ops:
            return
        src = torch.tensor([s for s, _ in copy_ops], device=self.device)
        dst = torch.tensor([d for _, d in copy_ops], device=self.device)
        for k, v in self.kv_caches:
            copy_blocks_(k, src, dst)
            copy_blocks_(v, src, dst)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, prompt_logits_for: set[int] = frozenset()) -> StepLogits:
        """Run the step; `prompt_logits_for` are seq ids whose every-row logits are wanted."""
        self.copy_blocks(out.copy_ops)
        if self.graphs is not None and self.graphs.can_run(out, prompt_logits_for):
            return StepLogits([s.seq.seq_id for s in out.scheduled], self.graphs.run(out), {})
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables = [], [], []
        for s in out.scheduled:
            input_ids.extend(s.seq.token_ids[s.start:s.start + s.num_tokens])
            positions.extend(range(s.start, s.start + s.num_tokens))
            query_lens.append(s.num_tokens)
            seq_lens.append(s.start + s.num_tokens)
            tables.append(s.seq.block_table)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, self.kv_caches, meta)                 # [N, hidden]

        rows, sampled_ids, prompt = [], [], {}
        start = 0
        for s in out.scheduled:
            end = start + s.num_tokens
            if s.sample:
                rows.append(end - 1)
                sampled_ids.append(s.seq.seq_id)
            if s.seq.seq_id in prompt_logits_for:
                prompt[s.seq.seq_id] = (self.model.compute_logits(hidden[start:end]).float(), s.start)
            start = end
        sample = None
        if len(rows) == hidden.shape[0]:  # every row samples (a decode step): rows are 0..N-1, no gather
            sample = self.model.compute_logits(hidden)
        elif rows:
            sample = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [S, V]
        return StepLogits(sampled_ids, sample, prompt)
