"""GGUF files -> plain Hugging Face safetensors folders.

transformers reads a GGUF (dequantising its weights) when asked with `gguf_file=`; it then marks the
model as quantized with a GGUF quantizer, which `save_pretrained` would write back into config.json.
A converted model is a plain checkpoint, so that marking is cleared before saving.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import SlimlmError

# Architectures whose GGUF transformers can read and whose HF class slimlm's tools support.
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def gguf_architecture(path: str | os.PathLike) -> str:
    """The `general.architecture` field of a GGUF file (e.g. "llama")."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # the gguf reader raises many types on a bad file
        raise SlimlmError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}).",
                          "Expected a .gguf model file, as written by llama.cpp's converters.") from err


def clear_gguf_quantizer(model) -> None:
    """Forget that `model` was read from a GGUF, so it saves as a plain (dequantised) checkpoint."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method is None or str(getattr(method, "value", method)) != "gguf":
        return
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Read a GGUF file into `(model, tokenizer)` with plain (dequantised) weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise SlimlmError(f"{path.name} holds a {arch!r} model, which slimlm cannot load from GGUF.",
                          f"Supported GGUF architectures: {', '.join(SUPPORTED_GGUF_ARCHS)}. "
                          "For other models pass a Hugging Face folder or hub id.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SlimlmError(f"could not read the model in {path}: {err}",
                          "The file may be truncated or use a tensor type transformers cannot dequantise.") from err
    clear_gguf_quantizer(model)
    return model.eval(), tokenizer


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `path` (a GGUF file) as a safetensors folder at `out_dir`, atomically (temp dir + rename)."""
    out_dir = Path(out_dir)
    model, tokenizer = load_gguf(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
