"""`slimlm quantize`: GPTQ or RTN weight quantization, with held-out perplexity before and after.

    slimlm quantize smollm2-135m --method gptq --bits 4 --group-size 64 --sym \\
        --data builtin:wiki --samples 128 --seq-len 512 --out out/smollm2-gptq-int4

Reads the model in float32, measures perplexity on held-out text (the validation split of a built-in
corpus: calibration draws only from the train split), quantizes the decoder's linear layers (GPTQ layer
by layer on calibration windows, or RTN without data), measures again, and writes a GPTQ checkpoint
that vLLM, SGLang, TGI and transformers (+ gptqmodel) load unchanged, plus slimlm's manifest with
the scheme, the settings and both perplexities. Also runnable as `python recipes/quantize.py ...`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from slimlm.toolkit.errors import SlimlmError


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="GPTQ/RTN int4/int8 weight quantization to a GPTQ checkpoint",
                       description="Quantizes the decoder's linear layers (GPTQ on calibration text, or RTN), "
                       "prints held-out perplexity before and after, and writes a GPTQ-format checkpoint "
                       "(qweight/qzeros/scales/g_idx + quantization_config) with a slimlm manifest.")
    p.add_argument("model", help="built-in alias (smollm2-135m), model folder, slimlm export, .gguf or hub id")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="gptq (default; calibrates on --data) or rtn (no data)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (default) or 8")
    p.add_argument("--group-size", type=int, default=64, help="32, 64 (default), 128, or -1 for per channel")
    p.add_argument("--sym", action="store_true",
                   help="symmetric grid (fixed zero point; what Marlin-type GPU kernels need); default asymmetric")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ desc_act: quantize columns by decreasing activation, each group a run of that order "
                   "(scattered g_idx; served at the same speed). The most accurate option measured: SmolLM2 "
                   "int4 g64 asym with --mse-clip and 256 samples +9.0%% perplexity (with --static-groups +10.5%%)")
    p.add_argument("--static-groups", action="store_true",
                   help="with --act-order: keep groups on consecutive columns (trivial g_idx, for kernels that need "
                   "it; SmolLM2 int4 g64 sym: +13.2%% perplexity against +14.7%% with dynamic groups)")
    p.add_argument("--mse-clip", action="store_true",
                   help="search each group's clipping range for the lowest rounding error (same format; slower)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H) (default 0.01)")
    p.add_argument("--skip", action="append", metavar="REGEX", default=None,
                   help="keep modules whose name matches in full precision, repeatable (default: lm_head, embed)")
    p.add_argument("--quantize-lm-head", choices=["int8", "int4"], default=None,
                   help="also quantize the LM head (RTN, the body's group size; untied from the embeddings, which "
                        "stay dense): int8 is near lossless (+0.09%% perplexity on SmolLM2), int4 costs ~13%%. "
                        "Written as GPTQ `lm_head: true`: slimlm, vLLM, SGLang and GPTQModel serve the smaller "
                        "head; transformers (optimum) and TGI expect a dense head and cannot load the folder")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "fp16", "bfloat16", "bf16"],
                   help="dtype of the stored scales and unquantized tensors (default float16)")
    p.add_argument("--data", default="builtin:wiki",
                   help="calibration text: builtin:NAME (train split), a .txt/.jsonl/.parquet file or hf:<id>")
    p.add_argument("--samples", "--calib-samples", dest="samples", type=int, default=128,
                   help="calibration windows (default 128)")
    p.add_argument("--seq-len", "--calib-len", dest="seq_len", type=int, default=512,
                   help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--compute-dtype", choices=["auto", "bf16", "float32"], default="auto",
                   help="dtype of calibration forward passes (default auto: bf16 where the CPU or GPU multiplies "
                   "it natively, ~3x faster than float32 there; float32 on CPUs without, e.g. AVX2 only)")
    p.add_argument("--hessian-dtype", choices=["bf16", "float32"], default=None,
                   help="precision of the Hessian products (default: --compute-dtype's; float32 products of bf16 "
                   "activations take ~2.5x the time of bf16 ones)")
    p.add_argument("--eval-data", default="builtin:wiki",
                   help="held-out text for perplexity (validation split of built-in corpora; default builtin:wiki)")
    p.add_argument("--eval-windows", type=int, default=16, help="perplexity windows before and after (default 16)")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run_quantize(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from slimlm.toolkit.data import calibration_samples, load_texts
    from slimlm.toolkit.export import check_target, kept_transforms, read
    from slimlm.toolkit.models import load, refuse_quantized
    from slimlm.toolkit.quant.calibrate import default_compute_dtype, quantize_model
    from slimlm.toolkit.quant.gptq_format import save_gptq
    from slimlm.toolkit.quant.lm_head import HEAD_NAME, quantize_lm_head

    scheme, head = check_args(args)  # everything cheap is checked before the (slow) model load
    out = Path(args.out)
    check_target(out, args.overwrite)
    refuse_quantized(args.model, "quantize")
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(stderr=True)
    model, tokenizer = load(args.model, dtype="float32")
    figures = {}
    if not args.no_eval:
        figures["perplexity_before"] = _perplexity(model, tokenizer, args)
        console.print(f"perplexity before: {figures['perplexity_before']:.3f}")
    samples = None
    if args.method == "gptq":
        texts = load_texts(args.data, split="train", tokenizer=tokenizer)
        samples = calibration_samples(texts, tokenizer, args.samples, args.seq_len, seed=args.seed)
    compute_dtype = {"bf16": torch.bfloat16, "float32": torch.float32}.get(args.compute_dtype)
    if compute_dtype is None:  # auto
        compute_dtype = default_compute_dtype(next(model.parameters()).device)
    args.compute_dtype = "bf16" if compute_dtype == torch.bfloat16 else "float32"  # what the manifest records
    start = time.perf_counter()
    if head is not None:  # first: a head the scheme cannot hold is refused before the calibration
        head_codes = quantize_lm_head(model, head)
    state = quantize_model(model, scheme, args.method, samples, damp=args.damp,
                           compute_dtype=compute_dtype,
                           hessian_dtype=args.hessian_dtype)
    if head is not None:
        state[HEAD_NAME] = head_codes
    seconds = time.perf_counter() - start
    if not args.no_eval:
        figures["perplexity_after"] = _perplexity(model, tokenizer, args)

    settings = {k: getattr(args, k) for k in ("method", "data", "samples", "seq_len", "seed", "damp",
                                              "compute_dtype", "hessian_dtype", "quantize_lm_head", "eval_data", "eval_windows", "window")}
    quant = {"method": args.method, "seconds": round(seconds, 1), "damp": args.damp}
    if samples is not None:
        quant["calibration"] = {"data": args.data, "split": "train", "samples": args.samples,
                                "seq_len": args.seq_len, "seed": args.seed}
    meta = {"base_model": args.model, "command": args.command_line, "config": settings,
            "eval": {"held_out": f"{args.eval_data} (validation)", **figures} if figures else {},
            "transforms": {**kept_transforms(args.model), "quant": quant}}
    save_gptq(model, tokenizer, state, scheme, out, meta=meta, overwrite=args.overwrite, lm_head_scheme=head)
    manifest = read(out)

    table = Table(title=f"quantize: {args.model} ({args.method}, int{args.bits}, group {args.group_size}, "
                        f"{'sym' if args.sym else 'asym'}{', act-order' if args.act_order else ''}"
                        f"{f', LM head {args.quantize_lm_head}' if head else ''})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    if figures:
        before, after = figures["perplexity_before"], figures["perplexity_after"]
        table.add_row(f"perplexity before ({args.eval_windows} x {args.window} tokens)", f"{before:.3f}")
        table.add_row("perplexity after", f"{after:.3f}")
        table.add_row("change", f"{100 * (after / before - 1):+.1f}%")
    table.add_row("quantized linears", str(len(state)))
    table.add_row(f"{args.method} seconds", f"{seconds:.1f}")
    table.add_row("checkpoint", f"{out} ({len(manifest.tensor_files)} tensor file(s), verified)")
    Console().print(table)
    from slimlm.toolkit.quant.calibrate import split_fused_groups

    for line in engine_notes(scheme, head, split_fused_groups(model, state)):
        Console(stderr=True).print(f"note: {line}")
    return 0


def engine_notes(scheme, head, split: list[str] = ()) -> list[str]:
    """Where the folder loads beyond slimlm, when that is not everywhere (read from the engines' GPTQ loaders).
    `split`: linears kept dense beside quantized ones of their fused group (`split_fused_groups`)."""
    notes = []
    if split:
        notes.append(f"--skip keeps {', '.join(split[:3])}{' ...' if len(split) > 3 else ''} dense beside quantized "
                     "q/k/v or gate/up of the same layer: slimlm serves that (the fused layer runs dense), but vLLM "
                     "and SGLang refuse a fused layer whose shards differ, and TGI needs all of them packed. Skip "
                     "whole groups for those engines.")
    if not scheme.sym:
        notes.append("asymmetric: vLLM and SGLang serve it with their plain GPTQ kernel in float16 (their Marlin "
                     "kernels need --sym), and GPTQModel refuses asymmetric GPTQ v1 folders it did not write."
                     + (" With --scale-dtype bfloat16, run vLLM or SGLang with --dtype float16." if
                        scheme.scale_dtype == "bfloat16" else ""))
    if head is not None:
        notes.append("the quantized LM head loads in slimlm, vLLM, SGLang and GPTQModel; transformers (optimum) and "
                     "TGI expect a dense lm_head.weight and cannot load this folder.")
    return notes


def check_args(args, data: bool = True):
    """The scheme and the LM head's (or None) the options give, their values checked (SlimlmError); with `data`,
    also that the data sources name something readable here."""
    from slimlm.toolkit.data import check_source
    from slimlm.toolkit.quant.lm_head import head_scheme
    from slimlm.toolkit.quant.scheme import DEFAULT_SKIP, QuantScheme

    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym, scale_dtype=args.scale_dtype,
                         act_order=args.act_order, static_groups=args.static_groups, mse_clip=args.mse_clip,
                         skip=tuple(args.skip) if args.skip else DEFAULT_SKIP)
    head = head_scheme(scheme, args.quantize_lm_head) if args.quantize_lm_head else None
    if args.method == "rtn" and args.act_order:
        raise SlimlmError("--act-order is a GPTQ option; RTN rounds every column alike.",
                          "Drop --act-order, or use --method gptq.")
    if args.samples < 1 or args.seq_len < 2 or args.eval_windows < 1 or args.window < 2 or not args.damp > 0:
        raise SlimlmError("--samples and --eval-windows must be >= 1, --seq-len and --window >= 2, --damp > 0.")
    if args.threads is not None and args.threads < 1:
        raise SlimlmError(f"--threads must be at least 1, got {args.threads}.")
    for flag, spec, used in (("--data", args.data, args.method == "gptq"), ("--eval-data", args.eval_data, not args.no_eval)):
        if used and data:
            try:
                check_source(spec)
            except SlimlmError as err:
                raise SlimlmError(f"{flag}: {err.what}", err.hint) from None
    return scheme, head


def _perplexity(model, tokenizer, args) -> float:
    from slimlm.toolkit.data import load_texts, token_stream
    from slimlm.toolkit.eval import perplexity

    stream = token_stream(load_texts(args.eval_data, split="validation", tokenizer=tokenizer), tokenizer)
    return perplexity(model, stream, window=args.window, max_windows=args.eval_windows)["perplexity"]


def main(argv: list[str] | None = None) -> int:
    """`python recipes/quantize.py ...`: the same options as `slimlm quantize`."""
    from slimlm.recipes.cli import run_script

    return run_script("quantize", argv)


if __name__ == "__main__":
    sys.exit(main())
