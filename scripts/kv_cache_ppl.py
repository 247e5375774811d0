"""Perplexity cost of the int8 KV cache and of a quantized LM head, measured through slimlm's serving
model and its paged cache.

    .venv/bin/python scripts/kv_cache_ppl.py [--model smollm2-135m] [--windows N] [--chunk 64]
                                             [--batch 16] [--dtypes fp32,bf16] [--kv auto,int8]
                                             [--lm-head none,int8,int4] [--kv-cache-gb 1]

Held-out text: the validation part of builtin:wiki (never used for calibration or training), as
one token stream cut into non-overlapping `--window`-token windows, like `toolkit.eval.perplexity`:
the first token of a window is context only, the other `window - 1` are scored. Each window is a
sequence of the serving model (`serve.models.load_model`), prefilled `--chunk` tokens per step
over a paged KV cache, so every chunk reads the earlier ones back from the cache, quantized when
`--kv int8`. `--chunk 1` writes one token per step, exactly as decoding does (so int8 block scales
grow token by token and re-round the block, the cache's worst case); `--batch` windows run side
by side as separate sequences of one step, as the engine batches them.

For each (model dtype, LM head, KV dtype) it prints the perplexity, its increase over the dense head
and "auto" cache of the same model dtype, and how many KV blocks `--kv-cache-gb` holds (what sets how many sequences
run at once). Prints one JSON object per line and a table at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.layers.kv_quant import resolve_kv_dtype
from slimlm.serve.models import load_model
from slimlm.serve.models.quant_head import quantize_lm_head
from slimlm.toolkit.data import load_texts, token_stream
from slimlm.toolkit.models import load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, kv_dtype: torch.dtype, chunk: int, batch: int,
               block_size: int) -> tuple[float, int]:
    """Summed NLL and token count of `windows` [N, W], each scored as one sequence of the serving model."""
    n, w = windows.shape
    per_seq = math.ceil(w / block_size)
    caches = model.allocate_kv_cache(batch * per_seq, block_size, dtype=kv_dtype)
    # Blocks interleaved across sequences, so no sequence's blocks are contiguous (as in the engine).
    tables = [[b * batch + s for b in range(per_seq)] for s in range(batch)]
    total, count = 0.0, 0
    for first in range(0, n, batch):
        group = windows[first:first + batch]                            # [B, W]
        b = group.shape[0]
        for start in range(0, w, chunk):
            end = min(start + chunk, w)
            c = end - start
            meta = AttentionMetadata.build([c] * b, [end] * b, tables[:b], block_size)
            ids = group[:, start:end].reshape(-1)                        # [B * c]
            pos = torch.arange(start, end).repeat(b)
            hidden = model(ids, pos, caches, meta)                       # [B * c, hidden]
            logits = model.compute_logits(hidden).float().view(b, c, -1)  # [B, c, V]
            scored = min(end, w - 1) - start                             # the window's last token has no target
            if scored > 0:
                targets = group[:, start + 1:start + 1 + scored]         # [B, scored]
                total += F.cross_entropy(logits[:, :scored].reshape(-1, logits.shape[-1]),
                                         targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
    return total, count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin:wiki")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per sequence per step (1 = decode-like)")
    ap.add_argument("--batch", type=int, default=8, help="windows per step")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtypes", default="fp32,bf16", help="model dtypes: fp32,bf16")
    ap.add_argument("--kv", default="auto,int8", help="KV cache dtypes: auto,int8")
    ap.add_argument("--lm-head", default="none", help="LM heads: none (dense), int8, int4 (RTN g64, as --quantize-lm-head)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory budget for the block counts")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, tok = load(args.model, dtype=torch.float32)
    stream = token_stream(load_texts(args.data, split="validation"), tok)
    n = stream.numel() // args.window
    n = n if args.windows is None else min(n, args.windows)
    windows = stream[:n * args.window].view(n, args.window)
    print(json.dumps({"model": args.model, "data": args.data, "split": "validation", "windows": n,
                      "window": args.window, "chunk": args.chunk, "batch": args.batch,
                      "block_size": args.block_size}), flush=True)

    rows = []
    for name in args.dtypes.split(","):
        base = None
        for head in args.lm_head.split(","):
            model = load_model(hf, dtype=DTYPES[name]).eval()
            if head != "none":
                quantize_lm_head(model, head)
            for kv in args.kv.split(","):
                kv_dtype = resolve_kv_dtype(kv, model.dtype)
                t0 = time.perf_counter()
                nll, count = window_nll(model, windows, kv_dtype, args.chunk, args.batch, args.block_size)
                ppl = math.exp(nll / count)
                base = ppl if kv == "auto" and head == "none" else base
                blocks = int(args.kv_cache_gb * 2**30) // model.kv_cache_block_bytes(args.block_size, kv_dtype)
                row = {"model_dtype": name, "lm_head": head, "kv_cache_dtype": kv,
                       "kv_storage": str(kv_dtype).removeprefix("torch."),
                       "ppl": round(ppl, 4), "rel_increase": None if base is None else round(ppl / base - 1, 5),
                       "tokens": count, "blocks_per_gb": round(blocks / args.kv_cache_gb),
                       "tokens_per_gb": round(blocks * args.block_size / args.kv_cache_gb),
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model

    print(f"\n{'model':>5} {'head':>5} {'kv':>5} {'ppl':>9} {'vs base':>9} {'blocks/GiB':>11} {'tokens/GiB':>11}")
    for r in rows:
        rel = "" if r["rel_increase"] is None else f"{100 * r['rel_increase']:+.2f}%"
        print(f"{r['model_dtype']:>5} {r['lm_head']:>5} {r['kv_cache_dtype']:>5} {r['ppl']:9.4f} {rel:>9} "
              f"{r['blocks_per_gb']:11d} {r['tokens_per_gb']:11d}")


if __name__ == "__main__":
    main()
