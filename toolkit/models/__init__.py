"""Model loading: built-in aliases, local HF folders, hub ids, GGUF files, slimlm exports, tiny test models."""
from .tiny import byte_tokenizer, tiny_model

__all__ = ["byte_tokenizer", "tiny_model"]
