"""How much of the int4 RTN perplexity gap QAT closes on SmolLM2-135M (issue 7's target: >= 50% in <= 200 steps).

    python scripts/qat_gap.py [--steps 100] [--lr 5e-5] [--group-size 64] [--eval-windows 40] [--threads 1] \\
        [--out /tmp/qat-gap] [--json gap.json] [key=value ...]

Runs recipes/qat.py with configs/qat/smollm2-135m.yaml (plus the options above and any key=value
overrides of that config) and reports, on the same held-out windows (builtin:wiki's validation split,
the last 10% of wiki.utf8, non-overlapping 512-token windows; training reads only the train split):
- base: the unquantised model (float32);
- RTN: the QAT start, int4 RTN of the base model (the fake-quant model at step 0 equals it bit for bit);
- QAT: the result after --steps steps, converted to plain dequantized weights (what the checkpoint holds);
- QAT export: the packed GPTQ checkpoint loaded back through slimlm's loader (non-quantized tensors in
  float16, as every GPTQ checkpoint stores them);
and `gap closed = (ppl_RTN - ppl_QAT) / (ppl_RTN - ppl_base)`. No library logic lives here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qat" / "smollm2-135m.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="QAT optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--init", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows per perplexity")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU: spinning OpenMP threads stall)")
    p.add_argument("--precision", default="bf16", choices=["32", "bf16"])
    p.add_argument("--out", default="/tmp/qat-gap", help="run folder (replaced)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more overrides of the config")
    args = p.parse_args(argv)

    import shutil

    import torch

    from slimlm.recipes.config import load_config
    from slimlm.recipes.qat import QATConfig, main as qat_main, perplexity
    from slimlm.recipes.training import quiet_libraries
    from slimlm.toolkit.export import read
    from slimlm.toolkit.models import load

    quiet_libraries()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    overrides = [f"max_steps={args.steps}", f"lr={args.lr}", f"quant.bits={args.bits}", f"quant.group_size={args.group_size}",
                 f"quant.sym={str(args.sym).lower()}", f"init={args.init}", f"eval_windows={args.eval_windows}",
                 "eval_window=512", f"threads={args.threads}", f"precision={args.precision}", f"out_dir={args.out}",
                 f"checkpoint_every={max(args.steps, 1)}", "progress=false", f"log_every={min(10, args.steps)}",
                 f"warmup_steps={max(1, args.steps // 20)}", *args.overrides]
    config = load_config(QATConfig, CONFIG, overrides)
    start = time.perf_counter()
    export = qat_main(config)
    seconds = time.perf_counter() - start
    r = read(export).eval["qat"]
    model, tok = load(str(export))  # the packed checkpoint, as served
    exported = perplexity(model, tok, config)
    base, rtn, after = r["perplexity_base"], r["perplexity_start"], r["perplexity_after"]
    result = {"scheme": r["scheme"], "init": args.init, "steps": r["steps"], "lr": args.lr,
              "tokens_per_step": config.batch_size * config.seq_len * config.grad_accum,
              "train_data": f"{config.data} ({config.data_split} split, first {config.max_blocks} blocks of {config.seq_len})",
              "eval": f"{config.eval_data or config.data} validation, {args.eval_windows} x 512 tokens",
              "perplexity": {"base": base, "rtn": rtn, "qat": after, "qat_export": exported},
              "gap_closed": round((rtn - after) / (rtn - base), 4),
              "gap_closed_export": round((rtn - exported) / (rtn - base), 4),
              "kd": {"first": r["first"], "final": r["final"]}, "seconds": round(seconds, 1), "threads": args.threads,
              "command": "python scripts/qat_gap.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    s = r["scheme"]
    name = f"int{s['bits']} g{s['group_size']} {'sym' if s['sym'] else 'asym'}"
    print(f"\nSmolLM2-135M, {result['eval']}; QAT {r['steps']} steps ({args.init} start, lr {args.lr}, "
          f"{result['tokens_per_step']} tokens/step, KD from the unquantised model), {seconds / 60:.1f} min")
    print(f"{'model':<24}{'perplexity':>12}")
    for label, value in (("base (fp32)", base), (f"RTN {name}", rtn), (f"RTN + QAT {name}", after),
                         ("QAT export (GPTQ dir)", exported)):
        print(f"{label:<24}{value:>12.3f}")
    print(f"gap closed: {100 * result['gap_closed']:.1f}% (export: {100 * result['gap_closed_export']:.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
