"""Turn the last-position logits of a batch into next tokens, each row with its own settings.

Everything is vectorised over rows except per-request seeds (one torch.Generator each, so a seeded
request gives the same text whatever else is in the batch). Filters that no row uses cost nothing.
`reference_sample_row` is the plain one-row version the tests compare against.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from ..kernels.cpu_build import build_cpu_kernels, kernels_enabled
from ..sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float] | None  # log p(chosen token) under the model's (unfiltered) distribution; None where
    #                               no row asked for logprobs (a log-softmax over the vocabulary saved)
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, (token, logprob) best first


def apply_penalties(logits, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]):
    """Repetition (prompt + output), presence and frequency (output) penalties, in place on [S, V]."""
    S, V = logits.shape
    for i, p in enumerate(params):
        if not p.needs_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt_ids[i]) | set(output_ids[i])), dtype=torch.long)
            if seen.numel():
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output_ids[i]:
            counts = torch.bincount(torch.tensor(output_ids[i], dtype=torch.long), minlength=V)[:V].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def filter_logits(logits, params: list[SamplingParams]):
    """Temperature, then top-k, top-p and min-p masks (to -inf), for rows that sample. [S, V] -> [S, V]."""
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=logits.dtype)
    logits = logits / temps[:, None]
    if any(0 < p.top_k < logits.shape[1] for p in params):
        for i, p in enumerate(params):
            if 0 < p.top_k < logits.shape[1]:
                kth = torch.topk(logits[i], p.top_k).values[-1]
                logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop[:, 0] = False  # the most likely token always stays (top_p may round to 0 in float32)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompt_ids: list[list[int]] | None = None, output_ids: list[list[int]] | None = None) -> SamplerOutput:
    """Pick one token per row of `logits` [S, V]. Greedy rows take the argmax of the penalised logits."""
    if all(p.greedy and p.logprobs is None and not p.needs_penalties for p in params):
        return SamplerOutput(argmax_rows(logits), None, None)  # the common decode step: no float32 copy
    logits = logits.float()
    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # the model's own distribution
    if any(p.needs_penalties for p in params):
        logits = apply_penalties(logits.clone(), params, prompt_ids or [[]] * len(params), output_ids or [[]] * len(params))
    tokens = logits.argmax(-1)
    sampling_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampling_rows:
        idx = torch.tensor(sampling_rows)
        probs = filter_logits(logits[idx], [params[i] for i in sampling_rows]).softmax(-1)
        # A row that still lost every token (inf/NaN from extreme settings) falls back to its argmax
        # rather than failing the whole batch.
        probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
        for j, i in enumerate(sampling_rows):
            if probs[j].sum() > 0:
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).item()
    if not want_logprobs:
        return SamplerOutput(tokens.tolist(), None, None)
    chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    top = None
    k = max((p.logprobs or 0) for p in params)
    if k > 0:
        vals, ids = torch.topk(raw_logprobs, k, dim=-1)
        top = [list(zip(ids[i, : (p.logprobs or 0)].tolist(), vals[i, : (p.logprobs or 0)].tolist()))
               for i, p in enumerate(params)]
    return SamplerOutput(tokens.tolist(), chosen.tolist(), top)


def argmax_rows(logits) -> list[int]:
    """`logits.argmax(-1).tolist()` for [S, V]: the same tokens (first maximum; a NaN counts as the largest), from
    slimlm's C kernel on CPU in bf16 or float32 (PyTorch's CPU argmax is a scalar loop: ~90 us a row of 49,152
    float32 logits, ~250 us in bf16), else from PyTorch. bf16 -> float32 is exact and keeps the order, so
    either dtype gives the token float32 logits would."""
    if (logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype in (torch.bfloat16, torch.float32)
            and logits.is_contiguous() and kernels_enabled() and (lib := _argmax_library()) is not None):
        out = torch.empty(logits.shape[0], dtype=torch.long)
        lib.slimlm_argmax(logits.data_ptr(), out.data_ptr(), logits.shape[0], logits.shape[1],
                          int(logits.dtype == torch.bfloat16))
        return out.tolist()
    return logits.argmax(-1).tolist()


@functools.cache
def _argmax_library():
    lib = build_cpu_kernels("argmax")
    if lib is not None:
        lib.slimlm_argmax.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
        lib.slimlm_argmax.restype = None
    return lib


def reference_filtered_row(logits_row, p: SamplingParams, prompt_ids=(), output_ids=()):
    """One row, written plainly: penalties, temperature, top-k, top-p, min-p -> logits with -inf.

    The specification that `apply_penalties` and `filter_logits` are tested against.
    """
    x = logits_row.float().clone()
    if p.repetition_penalty != 1:
        for t in set(prompt_ids) | set(output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output_ids):
        x[t] -= p.frequency_penalty * list(output_ids).count(t) + p.presence_penalty
    if p.greedy:
        return x
    x = x / p.temperature
    if 0 < p.top_k < x.numel():
        x[x < torch.topk(x, p.top_k).values[-1]] = float("-inf")
    if p.top_p < 1:
        probs = x.softmax(-1)
        keep = torch.zeros_like(x, dtype=torch.bool)
        mass = 0.0
        for t in torch.argsort(probs, descending=True).tolist():
            if mass >= p.top_p:
                break
            keep[t] = True
            mass += probs[t].item()
        x[~keep] = float("-inf")
    if p.min_p > 0:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = float("-inf")
    return x
