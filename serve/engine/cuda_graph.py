"""Decode steps replayed from CUDA graphs: one captured graph per batch-size bucket.

At small batch a GPU decode step is bound by the host: ~15 kernel launches per layer, each a few
microseconds of Python and driver time, against a few microseconds of GPU work. A CUDA graph records
the whole step (every layer and the LM head) once and replays it with one launch.

A graph replays fixed kernels on fixed addresses, so a step's inputs are copied into static buffers
sized for the largest bucket: token ids, positions, KV slots, context lengths and block tables (as
wide as `max_model_len` needs). A step of b sequences runs the graph of the smallest bucket >= b; the
rows past b are padding: token 0 at position 0, a context of one position, writing and reading a
scratch KV block that no sequence owns (the runner allocates it past the block manager's blocks), so
their garbage never reaches a real sequence. Their logits are dropped.

What the kernels may not learn from the host at replay is fixed at capture: the rotary table covers
`max_model_len`, and the Triton decode kernel's split-K count is chosen for `max_model_len` (a short
context leaves trailing splits empty, which the reduce weighs 0). Only pure decode steps with one new
token per sequence, no prompt logprobs, a float KV cache and the Triton attention path are replayed;
every other step runs eagerly, as before.

Graphs are captured lazily, at a bucket's first step (two eager warm-up passes on a side stream, so
Triton compiles and cuBLAS picks its kernels outside the capture, then the capture). The captured step
runs each layer's elementwise chains (norms, rotary, SiLU-gate) as torch.compile'd fused kernels
(`layers/compiled.py`; 1.16x at batch 1 on an H200). On a CPU (tests)
the same padded step runs eagerly, which checks the padding and the static-buffer plumbing against the
plain path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels import use_triton
from ..layers.attention import AttentionMetadata
from ..layers.compiled import capturing
from .scheduler import SchedulerOutput

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Captures and replays the pure-decode steps of one model on one KV cache (see the module docstring)."""

    def __init__(self, model, kv_caches: list, block_size: int, max_model_len: int, max_batch: int,
                 scratch_block: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len = max_model_len
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        self.device = model.device
        self.capture = self.device.type == "cuda"
        self.scratch_block = scratch_block
        self.width = math.ceil(max_model_len / block_size)
        big = self.buckets[-1]
        as_long = dict(dtype=torch.long, device=self.device)
        self.inputs = torch.zeros(4, big, **as_long)  # rows: token ids, positions, KV slots, context lengths
        self.tables = torch.full((big, self.width), scratch_block, **as_long)
        self.query_start = torch.arange(big + 1, **as_long)
        # bucket -> (graph, its static logits, its metadata). The metadata must live as long as the graph: the
        # kernels' per-step launch data (the Triton plan's index tensors) is cached on it and read at replay.
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, AttentionMetadata]] = {}
        self.steps = 0  # decode steps run through here (replayed, or padded eagerly on a CPU)

    def can_run(self, out: SchedulerOutput, prompt_logits_for) -> bool:
        """True for a pure decode step that fits the largest bucket and the captured block-table width."""
        sched = out.scheduled
        if self.capture and not use_triton(self.device):  # SLIMLM_TRITON=0 since: the graphs hold Triton kernels
            return False
        return (0 < len(sched) <= self.buckets[-1] and not (prompt_logits_for and any(
                    s.seq.seq_id in prompt_logits_for for s in sched))
                and all(s.sample and s.num_tokens == 1 and s.start < self.max_model_len for s in sched))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _pad_all(self) -> None:
        """Every row of the static inputs becomes padding (scratch block, context of one position)."""
        self.inputs[0:2] = 0
        self.inputs[2] = self.scratch_block * self.block_size
        self.inputs[3] = 1
        self.tables.fill_(self.scratch_block)

    def _meta(self, size: int, seq_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.inputs[2, :size], query_start_loc=self.query_start[:size + 1],
                                 seq_lens=self.inputs[3, :size], block_tables=self.tables[:size],
                                 block_size=self.block_size, query_lens=[1] * size, seq_lens_list=seq_lens)

    def _forward(self, size: int, meta: AttentionMetadata) -> Tensor:
        hidden = self.model(self.inputs[0, :size], self.inputs[1, :size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)  # [size, V]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, Tensor, AttentionMetadata]:
        self._pad_all()  # warm-up passes run for real: only on padding, so they touch nothing but the scratch block
        meta = self._meta(size, [self.max_model_len] * size)  # host-side lengths: the longest the graph serves
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with capturing(), torch.cuda.stream(stream):  # the warm-up compiles the fused elementwise kernels
            for _ in range(2):
                self._forward(size, meta)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may run meanwhile.
        with capturing(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self._forward(size, meta)
        return graph, logits, meta

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> Tensor:
        """Logits [b, V] of the step's b decoding sequences, in `out.scheduled` order."""
        sched = out.scheduled
        b = len(sched)
        size = self.bucket(b)
        if self.capture and size not in self._graphs:
            self._graphs[size] = self._capture(size)
        pad = size - b
        scratch_slot = self.scratch_block * self.block_size
        host = torch.tensor([[s.seq.token_ids[s.start] for s in sched] + [0] * pad,
                             [s.start for s in sched] + [0] * pad,
                             [s.seq.block_table[s.start // self.block_size] * self.block_size
                              + s.start % self.block_size for s in sched] + [scratch_slot] * pad,
                             [s.start + 1 for s in sched] + [1] * pad], dtype=torch.long)
        # Only the blocks a context covers are ever read (the kernels mask by context length): copy those.
        used = [-(-(s.start + 1) // self.block_size) for s in sched]
        width = max(used)
        tables = torch.tensor([s.seq.block_table[:n] + [self.scratch_block] * (width - n) for s, n in zip(sched, used)]
                              + [[self.scratch_block] * width] * pad, dtype=torch.long)
        self.inputs[:, :size].copy_(host)
        self.tables[:size, :width].copy_(tables)
        self.steps += 1
        if not self.capture:
            return self._forward(size, self._meta(size, host[3].tolist()))[:b]
        graph, logits, _ = self._graphs[size]
        graph.replay()
        return logits[:b].clone()  # the next replay overwrites the static output
