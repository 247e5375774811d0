"""Quantize the LM head at serve time (opt-in): `--quantize-lm-head int4|int8` on `slimlm serve`/`bench`.

Why: GPTQ checkpoints keep the LM head dense (the usual skip list), and in a small model with a big
vocabulary it is a large share of what decode reads per token: SmolLM2-135M's tied head is 49152 x 576
(56 MB of bf16 against ~58 MB for every int4 decoder layer together). The embedding lookup keeps reading
the bf16 matrix (one row per token; where tied, from the replaced head's packed copy); only the output
projection is replaced.

How: round-to-nearest, asymmetric, per group of `group_size` inputs, bf16 scales (`toolkit.quant.rtn`,
the same arithmetic `slimlm quantize --method rtn` uses), built into the serving runtime's quantized
linear for the device (`QuantLinear` on CPU, `TritonQuantLinear` on CUDA). It changes the logits, so
it is off by default; its perplexity cost is measured by `scripts/kv_cache_ppl.py --lm-head`.
"""
from __future__ import annotations

import torch
from torch import nn

from slimlm.toolkit.quant.rtn import rtn_quantize
from slimlm.toolkit.quant.scheme import QuantScheme

from ..kernels import use_triton
from ..layers.quant_linear import ACT_DTYPES, QuantLinear

HEAD_QUANT = {"int4": 4, "int8": 8}


def quantize_lm_head(model: nn.Module, kind: str, group_size: int = 64) -> nn.Module:
    """Replace `model.lm_head` (a slimlm `CausalLM`) with its `kind` ("int4" or "int8") RTN quantization.

    The dense weight is read from the current head (`weight` attribute, or `dequantize()`); a head whose
    input width `group_size` does not divide falls back to one group per row. Returns the new head.
    Raises ValueError for an unknown kind or a dtype/device the quantized kernels cannot run.
    """
    model.lm_head = quantized_head(model, kind, group_size)
    return model.lm_head


def quantized_head(model: nn.Module, kind: str, group_size: int = 64) -> nn.Module:
    """The `kind` RTN quantization of `model.lm_head` as a new module, the model left as it is (a
    self-speculative draft reads its logits through it: see `SpeculativeConfig.draft_head`)."""
    if kind not in HEAD_QUANT:
        raise ValueError(f"an LM head quantizes to one of {', '.join(HEAD_QUANT)}, got {kind!r}")
    head = model.lm_head
    weight = head.dequantize() if hasattr(head, "dequantize") else getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"cannot read a dense [vocab, hidden] weight from the LM head {type(head).__name__}")
    dtype, device = model.dtype, model.device
    gs = group_size if weight.shape[1] % group_size == 0 else -1
    scheme = QuantScheme(bits=HEAD_QUANT[kind], group_size=gs, sym=False, scale_dtype="bfloat16")
    q = rtn_quantize(weight.detach().float().cpu(), scheme)
    gs = weight.shape[1] if gs == -1 else gs
    if device.type == "cuda" and use_triton(device):
        from ..layers.quant_linear_triton import TritonQuantLinear

        new = TritonQuantLinear.from_codes(q.codes, q.scales, q.zeros, gs, scheme.bits, None, dtype, device)
    elif device.type == "cpu" and dtype in ACT_DTYPES:
        new = QuantLinear.from_codes(q.codes, q.scales, q.zeros, gs, scheme.bits, None, dtype)
    else:
        raise ValueError(f"the quantized LM head runs on CPU in {ACT_DTYPES} or on CUDA with Triton; the model is "
                         f"{dtype} on {device.type}")
    return new


@torch.no_grad()
def head_error(dense: torch.Tensor, head: nn.Module, hidden: torch.Tensor) -> float:
    """Relative error ||h W_q^T - h W^T|| / ||h W^T|| of a quantized head on hidden states `hidden` [M, in]."""
    ref = hidden.float() @ dense.float().t()
    return ((head(hidden).float() - ref).norm() / ref.norm()).item()
