"""GPTQ int4 g64 of SmolLM2-135M by slimlm and by GPTQModel, side by side: calibration time and held-out perplexity.

Both tools quantize the same HF folder (the one slimlm reads `smollm2-135m` from) with the same
settings: int4, group 64, symmetric, no act-order, damp 0.01, the same 128 x 512-token calibration
windows (`slimlm.toolkit.data.calibration_samples` on builtin:wiki's train split, seed 0 or --seed; handed to
GPTQModel as token ids), the same thread count and calibration dtype. Each tool runs in its own
process, so its wall time, CPU time (all threads) and peak RSS (`os.wait4`) are its own: model load,
calibration, packing and saving. The tool's own quantize call is also timed (slimlm: the manifest's
`seconds`; GPTQModel: around `model.quantize`). Both checkpoints are then read back by slimlm's
loader (which reads any GPTQ checkpoint, dequantized) and evaluated by slimlm's perplexity on the same
held-out windows (builtin:wiki validation, 512-token windows), next to the unquantized base.

GPTQModel 7.7 wants torch>=2.14.1 and 7.6 pins numpy==2.2.6, so it is not a slimlm extra: install
it beside the venv, without its dependencies, and pass the folder:

    .venv/bin/python -m pip install --no-deps --target /tmp/gqsite gptqmodel==7.6.0 Defuser==0.0.28 \\
        Device-SMI==0.5.7 LogBar==0.4.15 PyPcre==0.6.4 TokeNicer==0.0.14 torchao==0.18.0
    .venv/bin/python -m pip install --no-deps --target /tmp/llmcsite llmcompressor==0.14.0.1 \
        compressed-tensors==0.19.0 loguru==0.7.3 nvidia-ml-py auto-round==0.15.1   # pins transformers<=5.17
    python scripts/compare_gptqmodel.py --gptqmodel-site /tmp/gqsite --llmcompressor-site /tmp/llmcsite \
        --tools slimlm,gptqmodel,llmcompressor --threads 1 --json out/gptqmodel.json

With --best each tool runs its most accurate options instead (same data, group 64, damp): asymmetric
grids; slimlm act-order with dynamic groups and its clipping search (`--act-order --mse-clip`);
GPTQModel its default group-aware act-order (`act_group_aware`) and its clipping search (`mse=2.4`).

llm-compressor writes compressed-tensors, which slimlm does not read: its model is evaluated in its own
process (so its "whole process" time includes that evaluation; compare its quantize-call time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODEL = "smollm2-135m"


def gptqmodel_quantize(args) -> dict:
    """In a child process: quantize the built-in model's HF folder with GPTQModel and save it to args.out."""
    import torch

    from slimlm.toolkit.data import calibration_samples, load_texts
    from slimlm.toolkit.models import builtin_model_dir, load

    torch.set_num_threads(args.threads)
    from gptqmodel import GPTQModel, QuantizeConfig, __version__

    src = builtin_model_dir(MODEL)
    _, tok = load(MODEL, dtype="float32")
    texts = load_texts(args.data, split="train", tokenizer=tok)
    samples = calibration_samples(texts, tok, args.samples, args.seq_len, seed=args.seed)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in samples]
    if args.best:  # GPTQModel's most accurate options: asymmetric, group-aware act-order, clipping search
        cfg = QuantizeConfig(bits=4, group_size=64, sym=False, desc_act=False, act_group_aware=True, mse=2.4,
                             damp_percent=args.damp, device="cpu")
    else:
        cfg = QuantizeConfig(bits=4, group_size=64, sym=True, desc_act=False, act_group_aware=False,
                             damp_percent=args.damp, device="cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = GPTQModel.load(str(src), cfg, dtype=dtype)
    start, cpu = time.perf_counter(), time.process_time()
    model.quantize(calib, batch_size=args.batch_size, calibration_data_min_length=1)
    quant_seconds, quant_cpu = time.perf_counter() - start, time.process_time() - cpu
    model.save(args.out)
    return {"tool": f"gptqmodel {__version__}", "quantize_seconds": round(quant_seconds, 1),
            "quantize_cpu_seconds": round(quant_cpu, 1)}


def llmcompressor_quantize(args) -> dict:
    """In a child process: GPTQ with llm-compressor (oneshot + GPTQModifier), then perplexity right there.

    llm-compressor writes compressed-tensors, not GPTQ, so slimlm's loader cannot read its folder; the
    quantized model is evaluated in this process instead, by slimlm's perplexity on the same windows.
    """
    import torch
    from datasets import Dataset

    from slimlm.toolkit.data import calibration_samples, load_texts, token_stream
    from slimlm.toolkit.eval import perplexity
    from slimlm.toolkit.models import load

    torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import __version__, oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, tok = load(MODEL, dtype="bf16" if args.dtype == "bf16" else "float32")
    texts = load_texts(args.data, split="train", tokenizer=tok)
    samples = calibration_samples(texts, tok, args.samples, args.seq_len, seed=args.seed)
    ds = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=args.damp, actorder=None)
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=args.samples,
            max_seq_length=args.seq_len, shuffle_calibration_samples=False, batch_size=args.batch_size)
    quant_seconds, quant_cpu = time.perf_counter() - start, time.process_time() - cpu
    model = model.float()
    stream = token_stream(load_texts("builtin:wiki", split="validation", tokenizer=tok), tok)
    r = perplexity(model, stream, window=512, max_windows=args.max_windows, progress=False)
    return {"tool": f"llmcompressor {__version__}", "quantize_seconds": round(quant_seconds, 1),
            "quantize_cpu_seconds": round(quant_cpu, 1),
            "perplexity_in_process": {"perplexity": r["perplexity"], "windows": r["windows"]}}


def run_tool(cmd: list[str], env: dict | None = None) -> dict:
    """Popen + wait4 so the rusage is this child's alone (RUSAGE_CHILDREN would sum all children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read both pipes to the end without reaping the child (communicate() would wait() for it).
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()))
               for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for t in readers:
        t.join()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    err = "".join(chunks["err"])
    if code:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{err[-4000:]}")
    return {"process_seconds": round(wall, 1), "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "stdout": "".join(chunks["out"]), "stderr": err}


def evaluate(folders: dict[str, str], args) -> dict[str, dict]:
    """Held-out perplexity of each model, all through slimlm's loader and evaluator, same windows."""
    import torch

    from slimlm.toolkit.data import load_texts, token_stream
    from slimlm.toolkit.eval import perplexity
    from slimlm.toolkit.models import load

    torch.set_num_threads(args.threads)
    out, stream = {}, None
    for name, spec in folders.items():
        model, tok = load(spec, dtype="float32")
        if stream is None:
            stream = token_stream(load_texts("builtin:wiki", split="validation", tokenizer=tok), tok)
        r = perplexity(model, stream, window=512, max_windows=args.max_windows, progress=False)
        out[name] = {"perplexity": r["perplexity"], "windows": r["windows"]}
        print(f"  {name}: perplexity {r['perplexity']:.4f} on {r['windows']} windows", flush=True)
        del model
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gptqmodel-site", default=None, help="folder holding gptqmodel (pip --target), put on "
                                                           "PYTHONPATH of the GPTQModel process only")
    ap.add_argument("--out-dir", default="out/compare-gptqmodel", help="where both checkpoints go")
    ap.add_argument("--data", default="builtin:wiki")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (all tools get the same)")
    ap.add_argument("--hessian-dtype", choices=["bf16", "float32"], default=None,
                    help="slimlm's --hessian-dtype (default: the calibration dtype's)")
    ap.add_argument("--dtype", choices=["bf16", "float32"], default="bf16",
                    help="calibration dtype of both tools (slimlm --compute-dtype; GPTQModel's model dtype)")
    ap.add_argument("--batch-size", type=int, default=16, help="GPTQModel calibration batch (slimlm: 8192 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: all)")
    ap.add_argument("--llmcompressor-site", default=None, help="folder holding llmcompressor (pip --target)")
    ap.add_argument("--tools", default="slimlm,gptqmodel", help="any of slimlm, gptqmodel, llmcompressor")
    ap.add_argument("--reuse", action="store_true", help="skip quantizing where the checkpoint already exists")
    ap.add_argument("--best", action="store_true", help="each tool's most accurate options (asymmetric; see the doc)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        fn = {"gptqmodel": gptqmodel_quantize, "llmcompressor": llmcompressor_quantize}[args.child]
        print("RESULT " + json.dumps(fn(args)))
        return 0

    root = Path(args.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows, folders = {}, {"base (fp32)": MODEL}
    for tool in args.tools.split(","):
        folder = root / (f"{tool}-int4-g64-{'best' if args.best else 'sym'}" + (f"-seed{args.seed}" if args.seed else ""))
        if tool != "llmcompressor":
            folders[tool] = str(folder)
        if args.reuse and (folder / "config.json").exists():
            continue
        load0 = os.getloadavg()[0]
        env = dict(os.environ)
        if tool == "slimlm":
            cmd = [sys.executable, "-m", "slimlm.recipes.cli", "quantize", MODEL, "--method", "gptq", "--bits", "4",
                   "--group-size", "64", "--sym", "--damp", str(args.damp), "--data", args.data,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--compute-dtype", args.dtype,
                   "--seed", str(args.seed), "--threads", str(args.threads), "--no-eval", "--out", str(folder), "--overwrite"]
            if args.hessian_dtype:
                cmd += ["--hessian-dtype", args.hessian_dtype]
            if args.best:
                cmd = [c for c in cmd if c != "--sym"] + ["--act-order", "--mse-clip"]
        elif tool in ("gptqmodel", "llmcompressor"):
            cmd = [sys.executable, __file__, "--child", tool, "--out", str(folder), "--data", args.data,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--damp", str(args.damp),
                   "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--seed", str(args.seed)] + (["--best"] if args.best else [])
            if args.max_windows:
                cmd += ["--max-windows", str(args.max_windows)]
            # GPTQModel 7.6 sizes its CPU worker pool to ceil(cores / 2) and then asks 2 workers of it for model
            # loading: on a 2-core machine that is 1 < 2 and quantize() raises. 2 workers is the least that works.
            env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
            site = args.gptqmodel_site if tool == "gptqmodel" else args.llmcompressor_site
            if site:
                env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        else:
            ap.error(f"unknown tool {tool!r}")
        print(f"{tool}: quantizing ...", flush=True)
        res = run_tool(cmd, env)
        if tool == "slimlm":
            from slimlm.toolkit.export import read

            quant = read(folder).transforms["quant"]
            res.update(tool="slimlm", quantize_seconds=quant["seconds"])
        else:
            res.update(json.loads(res["stdout"].split("RESULT ", 1)[1].splitlines()[0]))
        res["loadavg_1min"] = [load0, os.getloadavg()[0]]
        del res["stdout"], res["stderr"]
        rows[tool] = res
        print(f"  {json.dumps(res)}", flush=True)

    print("held-out perplexity (slimlm's loader and evaluator for all):", flush=True)
    ppl = evaluate(folders, args)
    if "llmcompressor" in rows:
        ppl["llmcompressor"] = rows["llmcompressor"]["perplexity_in_process"]
    base = ppl["base (fp32)"]["perplexity"]
    print(f"\nSmolLM2-135M, GPTQ int4 g64 {'each tool at its best (--best)' if args.best else 'sym'}, damp {args.damp}, {args.samples} x {args.seq_len} calibration tokens "
          f"(seed {args.seed}), "
          f"{args.dtype} calibration, {args.threads} threads")
    print(f"{'':14s} {'ppl':>8s} {'vs base':>8s} {'quantize s':>11s} {'process s':>10s} {'CPU s':>8s} "
          f"{'peak RSS GB':>12s} {'load':>10s}")
    # (llm-compressor's perplexity is taken in its own process, on its in-memory model, by the same evaluator)
    for name, p in ppl.items():
        r = rows.get(name, {})
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in ("quantize_seconds", "process_seconds", "process_cpu_seconds")]
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "-"
        ld = "-".join(f"{x:.1f}" for x in r["loadavg_1min"]) if "loadavg_1min" in r else "-"
        print(f"{name:14s} {p['perplexity']:8.3f} {100 * (p['perplexity'] / base - 1):+7.1f}% {cells[0]:>11s} "
              f"{cells[1]:>10s} {cells[2]:>8s} {rss:>12s} {ld:>10s}")
    for other in ("gptqmodel", "llmcompressor"):
        if "slimlm" in rows and other in rows:
            print(f"{other} / slimlm: " + ", ".join(f"{k} {rows[other][k] / rows['slimlm'][k]:.2f}x" for k in
                                                   ("quantize_seconds", "process_seconds", "process_cpu_seconds")))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "perplexity": ppl, "settings": vars(args),
                                               "command": " ".join(sys.argv)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
