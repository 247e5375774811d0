"""torch.compile for a decoder layer's elementwise chains on GPU: each chain becomes one kernel.

Eagerly, a layer's RMSNorm is ~5 kernels (add, cast up, normalise, cast down, scale), rotary ~4 and
SiLU-gate 2, each a few microseconds of launch and memory round trip for a few kilobytes of work at
decode. Inductor fuses each chain into one generated Triton kernel. The CPU has its own fused C kernels
(`norm.py`, `rotary.py`, `cpu_decode.py`), so only CUDA tensors come here.

The compiled functions are the plain PyTorch references themselves, compiled with dynamic shapes (one
compile serves every batch size) and with Inductor emulating eager's intermediate roundings (so bf16
results match the eager ops, which match Hugging Face's).

They run only inside `capturing()`: while the engine warms up and captures a decode step's CUDA graph
(`engine/cuda_graph.py`), which then replays the fused kernels. Outside a graph each compiled call
pays ~20 us of guard checks in Python, more than the launches it saves: measured on an H200 (426M
Llama, bf16, docs/benchmarks.md) the compiled chains made graph replays 1.16x faster at batch 1 (1.09x
at 16, 1.05x at 64) and eager steps 0.65-0.82x slower. SLIMLM_COMPILE=0 keeps the eager ops everywhere.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


_state = threading.local()


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """Inside: CUDA tensors' elementwise chains run compiled (a CUDA graph's warm-up and capture)."""
    before = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


def compile_enabled(x: Tensor) -> bool:
    """Whether `x`'s elementwise chains run compiled: a CUDA tensor inside `capturing()`, unless SLIMLM_COMPILE=0."""
    return (x.is_cuda and getattr(_state, "on", False)
            and os.environ.get("SLIMLM_COMPILE", "1").strip().lower() not in ("0", "false", "off"))


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` compiled by Inductor (dynamic shapes, eager's bf16/fp16 roundings), built once per function."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up for gate_up [N, 2 I] -> [N, I] (the eager ops the compiled kernel fuses)."""
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]
