"""Held-out perplexity, calibration time and peak memory of SmolLM2-135M under each quantization scheme.

    python scripts/quant_ppl.py [--max-windows N] [--threads 2] [--json out.json]

Rows: fp32 base, RTN int4 g64 (asym, sym), GPTQ int4 g64 (sym, asym, sym and asym + act-order), the same with
the clipping search (`mse_clip`: RTN asym, GPTQ asym, sym + act-order, asym + act-order), RTN and GPTQ
int8 g64 sym. GPTQ calibrates on 128 x 512 tokens of builtin:wiki's train split (seed 0, or --seed); perplexity is
on builtin:wiki's validation split (the last 10% of wiki.utf8) in non-overlapping 512-token windows.

Each row runs in its own process, so `ru_maxrss` (peak resident memory) and the wall time belong to
that row alone: model load, quantization, and evaluation. Quantization time is measured around
`quantize_model` only, as wall time and as CPU time of the process (on a machine shared with other
jobs the wall time also counts their share of the cores; the CPU time does not). No library logic lives here: it calls `slimlm.toolkit`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROWS = {
    "fp32": None,
    "rtn-int4-g64-asym": dict(method="rtn", bits=4, group_size=64, sym=False),
    "rtn-int4-g64-sym": dict(method="rtn", bits=4, group_size=64, sym=True),
    "gptq-int4-g64-sym": dict(method="gptq", bits=4, group_size=64, sym=True),
    "gptq-int4-g64-asym": dict(method="gptq", bits=4, group_size=64, sym=False),
    "gptq-int4-g64-sym-actorder": dict(method="gptq", bits=4, group_size=64, sym=True, act_order=True,
                                       static_groups=True),
    "gptq-int4-g64-asym-actorder": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                        static_groups=True),
    "gptq-int4-g64-asym-actorder-mse-damp0.05": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                                     static_groups=True, mse_clip=True, damp=0.05),
    "gptq-int4-g64-sym-fp32calib": dict(method="gptq", bits=4, group_size=64, sym=True, compute_dtype="float32"),
    "gptq-int4-g64-sym-bf16hessian": dict(method="gptq", bits=4, group_size=64, sym=True, hessian_dtype="bf16"),
    "gptq-int4-g64-sym-fp32hessian": dict(method="gptq", bits=4, group_size=64, sym=True, hessian_dtype="float32"),
    "gptq-int4-g64-asym-actorder-mse-fp32hessian": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                                        static_groups=True, mse_clip=True, hessian_dtype="float32"),
    "gptq-int4-g64-asym-actorder-mse-fp32calib": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                                      static_groups=True, mse_clip=True, compute_dtype="float32"),
    "rtn-int4-g64-asym-mse": dict(method="rtn", bits=4, group_size=64, sym=False, mse_clip=True),
    "gptq-int4-g64-asym-mse": dict(method="gptq", bits=4, group_size=64, sym=False, mse_clip=True),
    "gptq-int4-g64-sym-actorder-mse": dict(method="gptq", bits=4, group_size=64, sym=True, act_order=True,
                                           static_groups=True, mse_clip=True),
    "gptq-int4-g64-asym-actorder-mse": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                            static_groups=True, mse_clip=True),
    "gptq-int4-g64-sym-actorder-dyn": dict(method="gptq", bits=4, group_size=64, sym=True, act_order=True),
    "gptq-int4-g64-asym-actorder-dyn-mse": dict(method="gptq", bits=4, group_size=64, sym=False, act_order=True,
                                                static_groups=False, mse_clip=True),
    "rtn-int8-g64-sym": dict(method="rtn", bits=8, group_size=64, sym=True),
    "gptq-int8-g64-sym": dict(method="gptq", bits=8, group_size=64, sym=True),
}


def run_row(name: str, args) -> dict:
    """Quantize (per ROWS[name]) and evaluate in this process; return the figures."""
    import torch

    from slimlm.toolkit.data import calibration_samples, load_texts, token_stream
    from slimlm.toolkit.eval import perplexity
    from slimlm.toolkit.models import load
    from slimlm.toolkit.quant.calibrate import quantize_model
    from slimlm.toolkit.quant.scheme import QuantScheme

    torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype="float32")
    row = {"row": name, "threads": args.threads}
    spec = ROWS[name]
    if spec is not None:
        spec = dict(spec)
        method = spec.pop("method")
        options = {k: spec.pop(k) for k in ("damp", "compute_dtype", "hessian_dtype") if k in spec}  # quantize_model's
        if "compute_dtype" in options:
            options["compute_dtype"] = getattr(torch, options["compute_dtype"])
        samples = None
        if method == "gptq":
            texts = load_texts("builtin:wiki", split="train", tokenizer=tok)
            samples = calibration_samples(texts, tok, args.samples, args.seq_len, seed=args.seed)
        start, cpu = time.perf_counter(), time.process_time()
        state = quantize_model(model, QuantScheme(**spec), method, samples, progress=False, **options)
        row["quantize_seconds"] = round(time.perf_counter() - start, 1)
        # CPU seconds of all threads: on a shared machine, the part of the wall time that was ours.
        row["quantize_cpu_seconds"] = round(time.process_time() - cpu, 1)
        row["quantized_linears"] = len(state)
        row["rss_after_quantize_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    stream = token_stream(load_texts("builtin:wiki", split="validation", tokenizer=tok), tok)
    r = perplexity(model, stream, window=512, max_windows=args.max_windows, progress=False)
    row.update(perplexity=round(r["perplexity"], 4), windows=r["windows"],
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: all)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print(json.dumps(run_row(args.one, args)))
        return 0
    rows = []
    for name in args.rows.split(","):
        if name not in ROWS:
            p.error(f"unknown row {name!r}")
        cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--threads", str(args.threads),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        base = rows[0]["perplexity"] if rows[0]["row"] == "fp32" else None
        delta = f" ({100 * (row['perplexity'] / base - 1):+.1f}%)" if base else ""
        print(f"{name:28s} ppl {row['perplexity']:.3f}{delta}  quantize {row.get('quantize_seconds', 0):6.1f}s "
              f"(cpu {row.get('quantize_cpu_seconds', 0):6.1f}s)  peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
