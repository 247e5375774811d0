"""Fused kernels of the runtime: Triton on GPU (tested on CPU under `TRITON_INTERPRET=1`), each beside
the plain reference it is tested against.

Importing this package never imports Triton, so it works where Triton is not installed; ask
`triton_available()` before dispatching to a Triton kernel. The kernels themselves are reached as
attributes (`slimlm.serve.kernels.triton_paged_attention`), which imports `paged_attention_triton`
(and Triton) on first use. The references are reached the same way, lazily, because `serve.layers`
may import this package while it is itself still being imported.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

__all__ = ["interpreting", "reference", "reference_paged_attention", "triton_available",
           "triton_paged_attention", "triton_write_kv", "use_triton", "write_kv"]

_LAZY = {
    "triton_paged_attention": ("paged_attention_triton", "triton_paged_attention"),
    "triton_write_kv": ("paged_attention_triton", "triton_write_kv"),
    # The plain references the kernels are tested against (float64 loop; `write_kv` is plain PyTorch).
    "reference_paged_attention": ("..layers.attention", "reference_paged_attention"),
    "reference": ("..layers.attention", "reference_paged_attention"),
    "write_kv": ("..layers.attention", "write_kv"),
}


def interpreting() -> bool:
    """True when Triton kernels run on the CPU: TRITON_INTERPRET=1, set before Triton was imported.

    Triton decorates its own helpers (`tl.zeros`, `tl.max`, ...) when it is imported, so setting the
    variable afterwards is too late; once Triton is imported, ask Triton itself.
    """
    flag = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    tl = sys.modules.get("triton.language")
    helper = getattr(tl, "zeros", None)
    if type(helper).__name__ not in ("InterpretedFunction", "JITFunction"):
        return flag  # Triton not imported yet (it will read the flag), or a Triton we cannot ask
    return type(helper).__name__ == "InterpretedFunction"


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether a Triton kernel can run on `device` (default: the best device here).

    It can when Triton imports and either the device is CUDA, or TRITON_INTERPRET=1 makes Triton run
    kernels on CPU tensors (slow; for tests). A runtime should dispatch to Triton for CUDA tensors
    only: once a process has imported Triton in interpreter mode (as a pytest run of
    tests/serve/kernels does), this is True for the CPU too, for the rest of that process.
    """
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its libraries
        return False
    if interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def use_triton(device: torch.device | str) -> bool:
    """Whether the runtime should run its Triton kernels for tensors on `device`: a CUDA device where
    Triton works, unless SLIMLM_TRITON=0 (the PyTorch paths then run, for comparisons)."""
    if torch.device(device).type != "cuda" or os.environ.get("SLIMLM_TRITON", "1").strip() in ("0", "false", "off"):
        return False
    return triton_available(device)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    if not module.startswith("."):
        module = "." + module
    return getattr(importlib.import_module(module, __name__), attr)
