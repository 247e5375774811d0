"""One evaluation run: perplexity on each text source and accuracy on each task file, as one dict.

The dict is what `slimlm eval --json` writes and what `compare` will read: every figure together
with the settings that produced it, so two runs can be checked for being comparable.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .multiple_choice import load_tasks, multiple_choice
from .perplexity import perplexity


def source_name(spec: str) -> str:
    """A short row label: `builtin:wiki` -> `wiki`, `/data/my.jsonl` -> `my.jsonl`."""
    if spec.startswith("builtin:"):
        return spec.split(":", 1)[1]
    if spec.startswith("hf:"):
        return spec
    return Path(spec).name


def source_names(specs) -> list[str]:
    """`source_name` of each spec, or the spec itself where two specs would share a label (d1/val.txt and
    d2/val.txt), so no result overwrites another's."""
    names = [source_name(str(s)) for s in specs]
    return [str(s) if names.count(n) > 1 else n for s, n in zip(specs, names)]


def evaluate(model, tokenizer, data: list[str] = (), tasks: list[str] = (), split: str = "validation",
             window: int = 512, max_windows: int | None = None, batch_size: int = 4,
             progress: bool = True, spread_windows: bool = False) -> dict:
    """Evaluate `model` on text sources `data` (perplexity) and jsonl task files `tasks` (accuracy).

    `spread_windows`: with `max_windows`, windows spread evenly over each source instead of its first ones.
    Returns {"perplexity": {name: figures}, "tasks": {name: figures}, "data": specs, "seconds": ...}.
    """
    from ..data import load_texts, token_stream

    start = time.perf_counter()
    data, tasks = list(dict.fromkeys(data)), list(dict.fromkeys(tasks))  # a spec given twice: measured once
    results: dict = {"perplexity": {}, "tasks": {}, "data": data, "task_files": tasks}
    for spec, name in zip(data, source_names(data)):
        texts = load_texts(spec, split=split, tokenizer=tokenizer)
        stream = token_stream(texts, tokenizer)
        r = perplexity(model, stream, window=window, batch_size=batch_size, max_windows=max_windows,
                       progress=progress, tokenizer=tokenizer, spread=spread_windows)
        results["perplexity"][name] = {**r, "source": spec, "split": split}
    for path, name in zip(tasks, source_names(tasks)):
        rows = load_tasks(path)
        r = multiple_choice(model, tokenizer, rows, batch_size=batch_size * 2, progress=progress)
        results["tasks"][name] = {**r, "file": str(path)}
    results["seconds"] = round(time.perf_counter() - start, 2)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}
    return results


def write_json(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as indented JSON at `path` (parent folders created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share a half-written file
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
