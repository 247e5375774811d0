"""Decode speed of GPTQ int4/int8 folders served from their packed codes, against the bf16 engine.

Every engine runs the same prompts, interleaved within each repetition (A B C, A B C, ...), so load
that drifts on a shared machine hits all of them alike; the figure is the median of the per-rep
ratios to the first engine, with min and max: tokens/s with the prefill (every token over the run's
wall time), then of decoding alone (the tokens after each request's first, `serve.bench.run_engine`,
which also starts every run with a cold prefix cache), which is what the batch-N decode targets mean;
time prefill alone with --gen-len 1. "+layers" rows run the same quantized model with the fused C
decode stack off (the per-layer path), to show what the stack is worth; with --capped-stack, "+stack<=4"
rows run every model (the baseline too) with the stack limited to GEMV_MAX_ROWS rows, as it was before it
took up to STACK_MAX_ROWS (larger decode batches then run layer by layer).

    python scripts/time_quant_decode.py smollm2-135m /tmp/q4 /tmp/q8 --batch-sizes 1,16 --threads 2
    python scripts/time_quant_decode.py smollm2-135m /tmp/q4 --head int4,int8 --no-layer-path
    python scripts/time_quant_decode.py smollm2-135m /tmp/q4 --capped-stack --no-layer-path --batch-sizes 8,32
"""
from __future__ import annotations

import argparse
import statistics

import torch

from slimlm.serve.bench import run_engine
from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.layers.linear import GEMV_MAX_ROWS
from slimlm.serve.layers.quant_linear import QuantLinear
from slimlm.serve.models import cpu_decode
from slimlm.toolkit.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="the baseline first (e.g. smollm2-135m), then GPTQ folders")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-layer-path", action="store_true", help="skip the '+layers' (stack off) rows")
    ap.add_argument("--head", default="", help="also run each quantized folder with its LM head quantized at load: "
                                               "int4, int8 or both (int4,int8); '+head int4' rows")
    ap.add_argument("--capped-stack", action="store_true",
                    help=f"also run every model with the fused stack limited to {GEMV_MAX_ROWS} rows; '+stack<=4' rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = {}
    heads = [h for h in args.head.split(",") if h]
    for spec in args.models:
        for variant in [None, "layers", *heads, "capped"]:
            if (variant == "layers" and args.no_layer_path) or (variant == "capped" and not args.capped_stack):
                continue
            hf, tok = load(spec, dtype="bf16")
            head = variant if variant in ("int4", "int8") else None
            engine = LLMEngine(hf, tok, EngineConfig(max_num_seqs=64, num_blocks=512, quantize_lm_head=head))
            quant = sum(isinstance(m, QuantLinear) for m in engine.model.modules()) - (head is not None)
            if variant not in (None, "capped") and not quant:
                continue  # the baseline: no layer path or head variants
            if variant == "layers":
                engine.model._stack = None  # the per-layer path
            if variant == "capped" and (stack := cpu_decode.decode_stack_for(engine.model)) is not None:
                stack.max_rows = min(stack.max_rows, GEMV_MAX_ROWS)
                engine.model._stack = stack
            names = {None: "", "layers": " +layers", "capped": f" +stack<={GEMV_MAX_ROWS}"}
            suffix = names.get(variant, f" +head {variant}")
            engines[f"{spec}{suffix} ({quant} QuantLinear)"] = engine
    gen = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = [torch.randint(100, 20000, (args.prompt_len,), generator=gen).tolist() for _ in range(b)]
        for e in engines.values():  # warm-up (kernel builds, first allocations)
            run_engine(e, prompts, 4)
        times = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, e in engines.items():
                times[name].append(run_engine(e, prompts, args.gen_len))
        base = times[next(iter(engines))]
        print(f"batch {b}, {args.prompt_len}-token prompts, {args.gen_len} new tokens, {args.threads} threads, "
              f"median [min, max] of {args.reps}; tok/s and ratio to the first with the prefill"
              + ("; then of decoding alone (tokens after the first)" if args.gen_len > 1 else "") + ":")
        for name, runs in times.items():
            line = f"  {name:55s}"
            for key in ("tokens_per_s", "decode_tokens_per_s")[:1 + (args.gen_len > 1)]:
                tps = [getattr(r, key) for r in runs]
                ratios = [t / getattr(r0, key) for r0, t in zip(base, tps)]
                line += (f" {statistics.median(tps):7.1f} tok/s  x{statistics.median(ratios):.2f} "
                         f"[{min(ratios):.2f}, {max(ratios):.2f}]")
            print(line)


if __name__ == "__main__":
    main()
