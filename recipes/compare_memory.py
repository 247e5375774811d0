"""Memory figures of `slimlm compare`, each measured in a fresh process (a process's peak only grows).

- Evaluation peak (`compare._accuracy_job`): peak RSS while loading and evaluating, past the RSS before the load.
- Serving memory (`serving_memory_job`): the model loaded into slimlm's serving engine as compare times it
  (KV cache sized for the benchmark, a draft model where one drafts), after serving `concurrency` requests of
  the benchmark's prompts to `gen_len` tokens: its resident memory past the RSS before the load (the weights as
  the engine keeps them, packed int4/int8 included, and the KV cache), and the peak on the way (the load's
  transient copies). This is what the model costs to serve, where the evaluation peak is what it costs to
  evaluate (quantized models evaluate dequantized).

RSS is read from /proc/self/status (Linux); elsewhere getrusage's peak is all there is, and the figures are
marked inexact. Freed heap memory is returned to the system (glibc `malloc_trim`) before each reading. What the
process holds beyond the model is in the figure too (modules imported on the first load, the first tokenizer,
the prompts): tens of MB, the same for every model. On CUDA the report takes the GPU's allocated bytes instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from pathlib import Path

from slimlm.toolkit.errors import SlimlmError

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    found = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M) if _STATUS.exists() else None
    return int(found.group(1)) * 1024 if found else None


def peak_rss_bytes() -> int:
    """Peak RSS: VmHWM on Linux (ru_maxrss there also counts the pre-exec image, a fork of this possibly large
    process, which no reset lowers), else getrusage's ru_maxrss."""
    import resource

    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def rss_bytes() -> int | None:
    """Resident memory now (VmRSS), None where /proc is missing."""
    return _status_kb("VmRSS")


def reset_peak_rss() -> bool:
    """Lower the recorded peak RSS to the current RSS (Linux: `5` into /proc/self/clear_refs), else the
    peak of importing torch and transformers, which a small model's load may never exceed, would remain."""
    try:
        _STATUS.with_name("clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so RSS shows what is held."""
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def in_fresh_process(job, *args, what: str, hint: str):
    """`job(*args)` in a spawned process; its {"error", "hint"} result becomes a SlimlmError here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            result = pool.submit(job, *args).result()
        except BrokenProcessPool:
            raise SlimlmError(f"the process {what} died (out of memory?).", hint) from None
    if "error" in result:
        raise SlimlmError(result["error"], result["hint"])
    return result


def serving_memory_job(spec: str, settings: dict, plan: dict | None) -> dict:
    """In a fresh process: load `spec` into the engine as compare times it, serve one full batch, read memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported before the baseline

    from slimlm.recipes.cli import quiet_libraries
    from slimlm.recipes.compare import _engine, speed_prompts
    from slimlm.serve.bench import run_engine
    from slimlm.serve.engine.engine import LLMEngine  # noqa: F401 - imported before the baseline
    from slimlm.toolkit.models import load  # noqa: F401 - imported before the baseline

    quiet_libraries()
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    a = torch.ones(256, 256)
    (a @ a).sum().item()  # start the thread pools before the baseline: they are not the model's
    del a
    trim_heap()
    peak_exact = reset_peak_rss()
    resident = rss_bytes()  # None without /proc: then the peak is all there is
    before = resident if resident is not None else peak_rss_bytes()
    try:
        engine = _engine(spec, settings, plan)
        prompts = speed_prompts(engine.tokenizer, settings, settings["concurrency"])
        run_engine(engine, prompts, settings["gen_len"], concurrency=settings["concurrency"])
    except SlimlmError as err:
        return {"error": f"{spec}: {err.what}", "hint": err.hint}
    except (torch.OutOfMemoryError, MemoryError) as err:
        return {"error": f"{spec}: out of memory while serving ({type(err).__name__}).",
                "hint": "Lower --concurrency, --prompt-len or --gen-len, or free memory, and run again to resume."}
    peak = peak_rss_bytes()
    trim_heap()
    held = rss_bytes() if resident is not None else peak
    memory = {"serving_bytes": held - before, "serving_peak_bytes": peak - before, "baseline_rss_bytes": before,
              "kv_cache_bytes": engine.runner.kv_cache_bytes(), "exact": resident is not None,
              "peak_exact": peak_exact and resident is not None}
    if str(settings["device"]).startswith("cuda"):  # the weights and cache live there, not in RSS
        memory["cuda_bytes"] = torch.cuda.memory_allocated()
        memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return memory


def measure_serving_memory(spec: str, settings: dict, plan: dict | None = None) -> dict:
    """`serving_memory_job` in a spawned process (module doc)."""
    from slimlm.recipes import compare_memory as this  # by module name, also when run as a script

    return in_fresh_process(this.serving_memory_job, spec, settings, plan, what=f"serving {spec}",
                            hint="Free memory (or lower --concurrency) and run again to resume.")
