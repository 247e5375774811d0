"""Model loading: built-in aliases, local HF folders, hub ids, GGUF files, slimlm exports, tiny test models."""
from .builtin import BUILTIN_MODELS, builtin_model_dir
from .load import ModelSource, check_device, load, parse_dtype, refuse_quantized, resolve
from .tiny import byte_tokenizer, tiny_model

__all__ = ["BUILTIN_MODELS", "ModelSource", "builtin_model_dir", "byte_tokenizer", "check_device", "load", "refuse_quantized",
           "parse_dtype", "resolve", "tiny_model"]
