"""Export: the self-describing checkpoint every slimlm tool writes and reads.

An export is a plain Hugging Face folder (config, safetensors, tokenizer, generation config), so
any HF-compatible loader or server takes it unchanged, plus `slimlm.json`: a versioned manifest of
what was done to the model and the sha256 of config.json and every tensor file, checked by `read`.
"""
from .integrity import sha256_file
from .manifest import FORMAT_VERSION, MANIFEST_NAME, TRANSFORM_KEYS, Manifest
from .reader import is_export, kept_transforms, read
from .writer import check_target, write

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "TRANSFORM_KEYS", "Manifest", "is_export", "kept_transforms", "read",
           "check_target", "sha256_file", "write"]
