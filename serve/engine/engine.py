"""The engine: requests in, tokens out, one continuous-batching step at a time.

`LLMEngine.step()` asks the scheduler what to compute, runs it through the model runner, samples,
applies stops, and returns the (cumulative) outputs of every request that advanced. It is
synchronous and single-threaded on purpose: the HTTP server drives it from one background thread,
the offline `LLM` API from a plain loop.
"""
from __future__ import annotations

import itertools
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from ..kernels import use_triton
from ..layers.kv_quant import resolve_kv_dtype
from ..layers.sampler import sample
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .detokenizer import IncrementalText
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .draft_speculative import DraftSpeculator
from .hybrid_speculative import HybridSpeculator
from .ngram_speculative import NgramSpeculator
from .speculative import SelfSpeculator, SpeculativeConfig


class ContextTooLong(ValueError):
    """A max_model_len past what the model serves right: its context, or its sliding window."""


@dataclass
class EngineConfig:
    """Engine limits. `num_blocks` None: as many KV blocks as `kv_cache_gb` holds (at least enough
    for one sequence of `max_model_len`). `max_model_len` None: the model's context, capped at 4096.
    `kv_cache_dtype`: "auto" stores K/V in the model's dtype; "int8" in int8 with a scale per block
    and KV head (`serve/layers/kv_quant.py`), so the same `kv_cache_gb` holds ~2x the blocks of bf16
    (~4x of fp32) for a small accuracy cost."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    dtype: torch.dtype | None = None  # of weights (and of an "auto" KV cache); None keeps the model's
    kv_cache_dtype: str = "auto"  # "auto" | "int8"
    speculative: SpeculativeConfig | None = None  # self-speculative decoding (greedy requests), see speculative.py
    quantize_lm_head: str | None = None  # "int4" | "int8": RTN-quantize the LM head at load (models/quant_head.py)
    # Replay decode steps from CUDA graphs (engine/cuda_graph.py). None: on a CUDA model with a float KV
    # cache and the Triton attention; False: always eager; True: also on a CPU (padded eager steps, for tests).
    cuda_graphs: bool | None = None


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    outputs: list[CompletionOutput]
    generators: list[torch.Generator | None]
    arrival: float
    first_token_time: float | None = None
    prompt_logprobs: list | None = None
    prompt_top: list | None = None
    num_cached_tokens: int = 0
    done: set = field(default_factory=set)
    unforked: list[int] = field(default_factory=list)  # completions that start from seqs[0]'s prompt logits
    texts: list[IncrementalText] = field(default_factory=list)  # each completion's text, decoded as it grows


class LLMEngine:
    def __init__(self, hf_model, tokenizer, config: EngineConfig | None = None, model_name: str | None = None):
        from ..models import load_model
        from ..models.quant_head import quantize_lm_head

        self.config = config = config or EngineConfig()
        resolve_kv_dtype(config.kv_cache_dtype, torch.float32)  # refuse a bad value before loading
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(hf_model.config, "_name_or_path", None) or "model"
        self.model = load_model(hf_model, dtype=config.dtype).eval()
        if config.quantize_lm_head:
            quantize_lm_head(self.model, config.quantize_lm_head)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.model.dtype)
        ctx = getattr(hf_model.config, "max_position_embeddings", 4096) or 4096
        rope = self.model.args.rope_parameters
        linear = rope.get("rope_type") == "linear"
        longest = int(ctx * rope["factor"]) if linear else ctx  # as vLLM reads it
        if (config.max_model_len or 0) > longest:
            source = f"max_position_embeddings {ctx} times its linear RoPE factor" if linear else "max_position_embeddings"
            raise ContextTooLong(f"max_model_len {config.max_model_len} is past this model's context of {longest} "
                                 f"tokens ({source} in its config): positions past it were never trained and its "
                                 f"output there is not to be trusted; use a max model length of at most {longest}")
        window = self.model.args.sliding_window  # attention here is over the whole context: the same up to it
        if window is not None and (config.max_model_len or 0) > window:
            raise ContextTooLong(f"max_model_len {config.max_model_len} is past this model's sliding window of "
                                 f"{window} tokens; slimlm's runtime attends to the whole context, which gives the "
                                 f"model's output only up to the window: use a max model length of at most {window}")
        self.max_model_len = config.max_model_len or min(ctx, 4096, window or ctx)
        config.max_model_len = self.max_model_len
        num_blocks = config.num_blocks or self._blocks_for(config.kv_cache_gb)
        num_blocks = max(num_blocks, math.ceil(self.max_model_len / config.block_size))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, chunked_prefill=config.chunked_prefill), self.block_manager)
        graphs = config.cuda_graphs
        if graphs is None:
            graphs = self.model.device.type == "cuda" and self.kv_dtype != torch.int8 and use_triton(self.model.device)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, kv_dtype=self.kv_dtype,
                                  graph_batch=config.max_num_seqs if graphs else 0, max_model_len=self.max_model_len)
        if config.speculative is None:
            self.speculator = None
        elif config.speculative.draft_model is not None and config.speculative.prompt_lookup:
            self.speculator = HybridSpeculator(self.model, config.speculative, self.runner)
        elif config.speculative.draft_model is not None:
            self.speculator = DraftSpeculator(self.model, config.speculative, self.runner)
        elif config.speculative.prompt_lookup:
            self.speculator = NgramSpeculator(self.model, config.speculative)
        else:
            self.speculator = SelfSpeculator(self.model, config.speculative)
        if self.speculator is not None:
            self.speculator.generator_for = self._generator_of
        self.eos_token_ids = _eos_ids(hf_model, tokenizer)
        self._requests: dict[str, _Request] = {}
        self._owner: dict[int, tuple[_Request, int]] = {}  # seq_id -> (request, completion index)
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_spec(cls, spec: str, config: EngineConfig | None = None, dtype=None, device: str = "cpu"):
        """Load any model `slimlm.toolkit.models.load` accepts and serve it."""
        from slimlm.toolkit.models import load

        hf_model, tokenizer = load(spec, dtype=dtype, device=device)
        return cls(hf_model, tokenizer, config, model_name=spec)

    def _blocks_for(self, gb: float) -> int:
        per_block = self.model.kv_cache_block_bytes(self.config.block_size, self.kv_dtype)
        return max(1, int(gb * 2**30) // per_block)

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request; ValueError for an empty or too-long prompt or a duplicate id."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty; at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one new token); shorten the prompt")
        vocab = self.model.args.vocab_size
        if not set(map(type, prompt_token_ids)) <= {int}:  # (the common case checked at C speed)
            bad = next((t for t in prompt_token_ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)),
                       None)
            if bad is not None:
                raise ValueError(f"prompt token ids must be integers; got {bad!r} ({type(bad).__name__})")
            prompt_token_ids = [int(t) for t in prompt_token_ids]  # numpy's integers as Python's
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(prompt_token_ids)}..{max(prompt_token_ids)}")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        eos = eos | frozenset(params.stop_token_ids)
        req = _Request(request_id, list(prompt_token_ids), params, [], [], [], arrival)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt_token_ids)
            req.prompt_top = [None] * len(prompt_token_ids)
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), prompt_token_ids, params.max_tokens, eos, params, arrival)
            seq.skip_prefix_cache = params.prompt_logprobs is not None and i == 0
            req.seqs.append(seq)
            req.outputs.append(CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                                top_logprobs=[] if params.logprobs else None))
            req.generators.append(None if params.seed is None else torch.Generator().manual_seed(params.seed + i))
            req.texts.append(IncrementalText(self.tokenizer))
            self._owner[seq.seq_id] = (req, i)
        # n > 1: one prefill; the other completions fork from it when its first token is sampled.
        self.scheduler.add(req.seqs[0])
        req.unforked = list(range(1, params.n))
        self._requests[request_id] = req
        self.prompt_tokens_total += len(prompt_token_ids)

    def _generator_of(self, seq_id: int) -> torch.Generator | None:
        req, idx = self._owner[seq_id]
        return req.generators[idx]

    def abort_request(self, request_id: str) -> None:
        """Cancel a request and free its KV blocks now (no-op if unknown or finished)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for seq, out in zip(req.seqs, req.outputs):
            self.scheduler.abort(seq.seq_id)
            self._owner.pop(seq.seq_id, None)
            if self.speculator:
                self.speculator.forget(seq.seq_id)
            out.finish_reason = out.finish_reason or "abort"

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def stats(self) -> dict:
        bm = self.block_manager
        return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "requests": len(self._requests), "kv_blocks_used": bm.num_used_blocks,
                "kv_blocks_free": bm.num_free_blocks, "kv_blocks_total": bm.num_blocks,
                "prefix_cache_hit_rate": bm.hit_rate, "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "preemptions_total": self.scheduler.num_preemptions, **self._spec_stats()}

    def _spec_stats(self) -> dict:
        if self.speculator is None:
            return {}
        st = self.speculator.stats
        return {"spec_acceptance_rate": st.acceptance_rate, "spec_mean_accepted_length": st.mean_accepted_length,
                "spec_draft_tokens_total": st.drafted, "spec_accepted_tokens_total": st.accepted,
                "spec_steps_total": st.steps, "spec_lookup_steps_total": st.lookup_steps}

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        # Row t of a chunk predicts position start + t + 1: only chunks before the prompt's last token hold a target.
        want_prompt = {s.seq.seq_id for s in out.scheduled
                       if s.seq.skip_prefix_cache and s.start + 1 < s.seq.num_prompt_tokens}
        plan = self.speculator.plan(out, self.block_manager, self.max_model_len) if self.speculator else {}
        started = time.perf_counter()
        if plan:
            logits, new_tokens = self.speculator.execute(self.runner, out, plan, want_prompt)
        else:
            logits, new_tokens = self.runner.execute(out, want_prompt), {}
        if self.speculator and all(s.sample and s.num_tokens == 1 for s in out.scheduled):
            self.speculator.observe_step(time.perf_counter() - started, out, plan)  # a pure decode step
        advanced: dict[str, _Request] = {self._owner[i][0].request_id: self._owner[i][0] for i in new_tokens}
        for seq_id, (rows, first_pos) in logits.prompt.items():
            self._record_prompt_logprobs(self._owner[seq_id][0], rows, first_pos)
        forks: list[tuple[Sequence, Sequence, int]] = []  # (parent, child, child's first token)
        if logits.sampled_ids:
            seqs = [self._owner[i][0].seqs[self._owner[i][1]] for i in logits.sampled_ids]
            rows = list(range(len(seqs)))
            for j, seq in enumerate(list(seqs)):
                req, idx = self._owner[seq.seq_id]
                if idx == 0 and req.unforked and seq.num_output_tokens == 0:  # the prompt's logits: for all n
                    seqs += [req.seqs[i] for i in req.unforked]
                    rows += [j] * len(req.unforked)
                    req.unforked = []
            rows_sampled = logits.sample
            if len(rows) > len(logits.sampled_ids):
                rows_sampled = logits.sample.index_select(0, torch.tensor(rows, device=logits.sample.device))
            params = [s.params for s in seqs]
            gens = [self._owner[s.seq_id][0].generators[self._owner[s.seq_id][1]] for s in seqs]
            penal = any(p.needs_penalties for p in params)
            result = sample(rows_sampled, params, gens,
                            [s.prompt_token_ids for s in seqs] if penal else None,
                            [s.output_token_ids for s in seqs] if penal else None)
            now = time.perf_counter()
            for j, seq in enumerate(seqs):
                req, idx = self._owner[seq.seq_id]
                if j >= len(logits.sampled_ids):
                    forks.append((seqs[rows[j]], seq, result.tokens[j]))
                else:
                    new_tokens[seq.seq_id] = [result.tokens[j]]
                comp = req.outputs[idx]
                if comp.logprobs is not None:
                    comp.logprobs.append(result.logprobs[j])
                if comp.top_logprobs is not None:
                    comp.top_logprobs.append(result.top_logprobs[j])
                req.first_token_time = req.first_token_time or now
                advanced[req.request_id] = req
        grown_from = {s.seq.seq_id: s.seq.num_output_tokens for s in out.scheduled}
        before = sum(grown_from.values())
        self.scheduler.update(out, new_tokens)
        # What was appended: a speculative step's tokens past an EOS or max_tokens are dropped by update().
        self.generation_tokens_total += sum(s.seq.num_output_tokens for s in out.scheduled) - before
        if plan:
            self.speculator.after_update(plan, [s.seq for s in out.scheduled], self.block_manager)
        for parent, child, token in forks:
            self.scheduler.fork_sampled(parent.seq_id, child, token)
            new_tokens[child.seq_id] = [token]
            self.generation_tokens_total += 1
        for seq_id in new_tokens:
            req, idx = self._owner[seq_id]
            self._update_completion(req, idx)
        for s in out.scheduled if plan else ():  # counted by what the output kept (after stop strings cut it)
            if plan.get(s.seq.seq_id):
                self.speculator.settle(s.seq.seq_id, s.seq.num_output_tokens - grown_from[s.seq.seq_id])
        if self.speculator:  # however a sequence ended (EOS, a limit, a stop string), drop its drafting state
            for seq_id in new_tokens:
                if self._owner[seq_id][0].seqs[self._owner[seq_id][1]].is_finished:
                    self.speculator.forget(seq_id)
        return [self._finish_or_report(req) for req in advanced.values()]

    def _record_prompt_logprobs(self, req: _Request, rows: torch.Tensor, first_pos: int) -> None:
        logprobs = torch.log_softmax(rows, dim=-1)                      # [T, V]: row t predicts position first_pos+t+1
        k = req.params.prompt_logprobs
        for t in range(rows.shape[0]):
            target = first_pos + t + 1
            if target >= len(req.prompt_token_ids):
                break
            tok = req.prompt_token_ids[target]
            req.prompt_logprobs[target] = float(logprobs[t, tok])
            if k:
                vals, ids = torch.topk(logprobs[t], k)
                req.prompt_top[target] = list(zip(ids.tolist(), vals.tolist()))

    def _update_completion(self, req: _Request, idx: int) -> None:
        seq, comp = req.seqs[idx], req.outputs[idx]
        before = len(comp.token_ids)  # output tokens up to the previous step
        comp.token_ids = seq.output_token_ids
        text = req.texts[idx].update(comp.token_ids, final=seq.is_finished)
        if seq.is_finished:
            comp.finish_reason = seq.finish_reason
            last = comp.token_ids[-1] if comp.token_ids else None
            if comp.finish_reason == "stop" and last in req.params.stop_token_ids:
                comp.stop_reason = last
        found = _first_stop(text, len(comp.text), req.params.stop)
        held = req.texts[idx].read < len(comp.token_ids)  # the text waits for the rest of a character
        if req.params.stop and (found or held) and len(comp.token_ids) - before > 1:
            # several tokens in one step (a speculative step): end where plain decoding, one a step, would
            text, found = self._stop_as_plain_decoding(req, idx, before, found)
        if found:
            cut, comp.stop_reason = found
            text = text[:cut]
            if not seq.is_finished:
                self.scheduler.abort(seq.seq_id)
            comp.finish_reason = "stop"
        if comp.finish_reason is None and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its next byte
        if comp.finish_reason is None:
            text = text[:len(text) - _stop_prefix(text, req.params.stop)]  # hold back what a stop string may cut
        comp.text = text
        if comp.finish_reason is not None:
            req.done.add(idx)

    def _stop_as_plain_decoding(self, req: _Request, idx: int, before: int, found: tuple[int, str] | None):
        """The text and stop string where plain decoding, one token a step, would have stopped: at the first of
        this step's tokens whose text holds a stop string (also one the step's held-back text, waiting for the
        rest of a character, does not show yet); the tokens after it are dropped. `before`: the output tokens
        the previous step left; `found`: the stop in the step's text, if any."""
        seq, comp = req.seqs[idx], req.outputs[idx]
        ids = comp.token_ids
        for n in range(before + 1, len(ids)):
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # an incomplete character: plain decoding would have waited for the next token
            if (first := _first_stop(text, len(comp.text), req.params.stop)) is not None:
                seq.drop_last_tokens(len(ids) - n)
                self.generation_tokens_total -= len(ids) - n
                comp.token_ids = seq.output_token_ids
                for kept in (comp.logprobs, comp.top_logprobs):
                    if kept is not None:
                        del kept[n:]
                return text, first
        return req.texts[idx].text, found

    def _finish_or_report(self, req: _Request) -> RequestOutput:
        finished = len(req.done) == len(req.seqs)
        metrics = {"arrival": req.arrival, "first_token": req.first_token_time}
        if finished:
            metrics["finished"] = time.perf_counter()
            self._requests.pop(req.request_id, None)
            for seq in req.seqs:
                self._owner.pop(seq.seq_id, None)
        return RequestOutput(req.request_id, req.prompt_token_ids, req.outputs, finished,
                             req.prompt_logprobs, req.prompt_top,
                             # every completion starts from the first sequence's prompt: its first admission's hit
                             num_cached_tokens=req.seqs[0].num_cached_prefix_tokens or 0, metrics=metrics)


def _first_stop(text: str, sent: int, stops) -> tuple[int, str] | None:
    """(where it starts, which) of the stop string in `text` that ends first (the longer where two end together),
    searching what is new since the `sent` characters already given out; None where there is none."""
    found = [(cut, stop) for stop in stops if (cut := text.find(stop, max(0, sent - len(stop)))) != -1]
    return min(found, key=lambda f: (f[0] + len(f[1]), f[0]), default=None)


def _stop_prefix(text: str, stops) -> int:
    """Length of the longest end of `text` that begins a stop string (and is shorter than it): text a stream
    must not send yet, since the next tokens may complete the stop string, which the output leaves out."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _eos_ids(hf_model, tokenizer) -> frozenset[int]:
    ids = set()
    gen = getattr(hf_model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
