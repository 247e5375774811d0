"""Quantize a HF model's LM head for the GPTQ export (`slimlm quantize --quantize-lm-head int8|int4`).

Why: GPTQ tools keep the LM head dense by default, and in a small model with a large vocabulary it is
much of what decode reads per token (SmolLM2-135M: a 49,152 x 576 head, 56 MB in bf16 against ~58 MB for
all its int4 decoder layers). Written into the checkpoint (`lm_head: true` in `quantization_config`,
with a `dynamic` override `+:^lm_head$` when its bits or group size differ from the body's, which vLLM
and gptqmodel read), slimlm, vLLM, SGLang and gptqmodel serve the smaller head, and every evaluation sees its
error. transformers (through optimum) and TGI expect a dense `lm_head.weight` and cannot load such a folder
(transformers fills the head with random values): leave the head dense for them.

How: round-to-nearest with the body's group size, symmetry, clipping and scale dtype, at its own bits
(int8 measured +0.09% perplexity on SmolLM2 through the serving model, int4 +12.9%: docs/benchmarks.md).
A head tied to the input embeddings is untied first: the embedding keeps the dense matrix (it reads one
row per token), the head gets its own quantized copy, and config.json says `tie_word_embeddings: false`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import SlimlmError
from .qweight import QuantizedWeight
from .rtn import rtn_quantize
from .scheme import QuantScheme

HEAD_BITS = {"int8": 8, "int4": 4}
HEAD_NAME = "lm_head"  # the module name GPTQ configs mean by `lm_head`


def head_scheme(scheme: QuantScheme, kind: str) -> QuantScheme:
    """The scheme the LM head is quantized with: `scheme` at `kind`'s bits ("int8" or "int4"), no act-order."""
    if kind not in HEAD_BITS:
        raise SlimlmError(f"an LM head quantizes to one of {', '.join(HEAD_BITS)}, got {kind!r}.",
                          "Pass --quantize-lm-head int8 (near lossless) or int4.")
    return dataclasses.replace(scheme, bits=HEAD_BITS[kind], act_order=False, static_groups=False, skip=())


def quantize_lm_head(model: nn.Module, scheme: QuantScheme) -> QuantizedWeight:
    """RTN-quantize `model.lm_head` with `scheme` in place (untied from the embeddings first); return its codes.

    Afterwards the head holds the dequantized weight, so the model evaluates as the checkpoint will load.
    SlimlmError for a model whose output layer is not an `nn.Linear` named `lm_head`, or whose sizes the
    scheme cannot hold.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or getattr(model, HEAD_NAME, None) is not head:
        raise SlimlmError(f"{type(model).__name__} has no nn.Linear output layer named {HEAD_NAME}.",
                          "Drop --quantize-lm-head for this model.")
    scheme.check_layer(HEAD_NAME, head.out_features, head.in_features)
    untie_lm_head(model)
    qw = rtn_quantize(head.weight, scheme)
    with torch.no_grad():
        head.weight.copy_(qw.dequantize().to(head.weight.dtype))
    return qw


def untie_lm_head(model: nn.Module) -> None:
    """Give `model.lm_head` a weight of its own if it shares the input embedding's, and record that in the config."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if embed is not None and head.weight.untyped_storage().data_ptr() == embed.weight.untyped_storage().data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
