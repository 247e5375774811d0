"""slimlm's own model code for serving: Llama family (Llama 2/3, SmolLM2, Mistral), Qwen2, Qwen3."""
from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import LinearFactory, make_linear
from .gptq_weights import absorb_mlp_orders, gptq_dir, gptq_weights_for
from .llama import SUPPORTED_MODEL_TYPES, CausalLM, DecoderLayer, ModelArgs

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLM", "DecoderLayer", "ModelArgs", "load_model"]


def load_model(hf_model: nn.Module, dtype: torch.dtype | None = None,
               linear_factory: LinearFactory = make_linear, quantized_weights: bool = True) -> CausalLM:
    """Convert a loaded transformers causal LM into slimlm's paged-attention `CausalLM`.

    Raises ValueError, naming the supported families, when `hf_model.config.model_type` is not one of
    SUPPORTED_MODEL_TYPES. `dtype` defaults to the model's; `linear_factory` builds every projection.
    A model loaded from a GPTQ folder (`load_gptq`) gets its quantized projections as `QuantLinear`
    from the packed codes (`gptq_weights.py`; what stays dense and why is in `model.gptq`), unless
    `quantized_weights` is False or a `linear_factory` of the caller's is given.
    """
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot serve model_type {model_type!r} with slimlm's runtime; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}. Serve it with transformers or vLLM instead.")
    gptq = None
    if quantized_weights and linear_factory is make_linear and gptq_dir(hf_model) is not None:
        gptq = gptq_weights_for(hf_model, dtype or hf_model.get_input_embeddings().weight.dtype)
    model = CausalLM.from_hf(hf_model, config, dtype=dtype, make_linear=linear_factory,
                             quantized=None if gptq is None else gptq.linear)
    if gptq is not None:
        absorb_mlp_orders(model)
        gptq.warn_unexpected()
        gptq.layers = gptq.reference = None  # the packed copies now live in the QuantLinears
    model.gptq = gptq
    return model
