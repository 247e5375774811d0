"""Time the Triton paged attention against the PyTorch path on the same steps (one layer's call).

    python -m slimlm.serve.kernels.bench_paged_attention            # on a GPU: bf16, SmolLM2's heads
    python -m slimlm.serve.kernels.bench_paged_attention --heads 32 --kv-heads 8 --head-dim 128

Each scenario is checked against the PyTorch path first, then both are timed on the same inputs
(`triton.testing.do_bench` on CUDA: warm-up, then median, min and max over its repetitions).
Decode rows also give the K/V bytes read per second, to set against the card's memory bandwidth.
On the CPU (TRITON_INTERPRET=1) only `--tiny` makes sense: a smoke run, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from ..layers.attention import AttentionMetadata, paged_attention
from .paged_attention_triton import triton_paged_attention

# name -> [(cached tokens, new tokens)] per sequence
SCENARIOS = {
    "decode b1 L4096": [(4095, 1)],
    "decode b16 L1024": [(1023, 1)] * 16,
    "decode b64 L512": [(511, 1)] * 64,
    "decode b8 L16384": [(16383, 1)] * 8,
    "prefill 2048": [(0, 2048)],
    "chunk 512 after 2048": [(2048, 512)],
    "mixed 32 decodes + chunk 256": [(1023, 1)] * 32 + [(512, 256)],
}
TINY = {"decode": [(9, 1), (30, 1)], "prefill": [(0, 12)], "mixed": [(5, 1), (12, 4)]}


def make_step(seqs, block_size, heads, kv_heads, head_dim, dtype, device):
    lens = [c + n for c, n in seqs]
    need = [math.ceil(s / block_size) for s in lens]
    ids = torch.randperm(sum(need)).tolist()  # scattered blocks, as after some churn
    tables, start = [], 0
    for n in need:
        tables.append(ids[start:start + n])
        start += n
    meta = AttentionMetadata.build([n for _, n in seqs], lens, tables, block_size, device=device)
    cache_shape = (sum(need), block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=device)
    q = torch.randn(sum(n for _, n in seqs), heads, head_dim, dtype=dtype, device=device)
    return q, k_cache, v_cache, meta


def timed(fn, device) -> tuple[float, float, float]:
    """(median, min, max) milliseconds."""
    if device.type == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.0, 1.0]))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def run(scenarios, heads, kv_heads, head_dim, block_size, dtype, device) -> list[dict]:
    rows = []
    for name, seqs in scenarios.items():
        q, k_cache, v_cache, meta = make_step(seqs, block_size, heads, kv_heads, head_dim, dtype, device)
        scale = head_dim ** -0.5
        want = paged_attention(q, k_cache, v_cache, meta, scale)
        got = triton_paged_attention(q, k_cache, v_cache, meta, scale)
        err = (got.float() - want.float()).abs().max().item()
        t_ms = timed(lambda: triton_paged_attention(q, k_cache, v_cache, meta, scale), device)
        p_ms = timed(lambda: paged_attention(q, k_cache, v_cache, meta, scale), device)
        kv_bytes = 2 * sum(c + n for c, n in seqs) * kv_heads * head_dim * k_cache.element_size()
        rows.append({"scenario": name, "triton_ms": t_ms, "torch_ms": p_ms, "speedup": p_ms[0] / t_ms[0],
                     "kv_GBps": kv_bytes / t_ms[0] / 1e6, "max_abs_err": err})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny steps: a smoke run (e.g. on the CPU interpreter)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = run(TINY if args.tiny else SCENARIOS, args.heads, args.kv_heads, args.head_dim, args.block_size,
               getattr(torch, args.dtype), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    if args.json:
        print(json.dumps({"device": name, "args": vars(args), "rows": rows}))
        return rows
    print(f"{name}, {args.dtype}, heads {args.heads}/{args.kv_heads} x {args.head_dim}, block {args.block_size}")
    print(f"{'scenario':30} {'triton ms (min-max)':>24} {'torch ms (min-max)':>24} {'x':>6} {'KV GB/s':>8} {'err':>8}")
    for r in rows:
        t, p = r["triton_ms"], r["torch_ms"]
        print(f"{r['scenario']:30} {t[0]:9.4f} ({t[1]:.4f}-{t[2]:.4f}) {p[0]:9.4f} ({p[1]:.4f}-{p[2]:.4f}) "
              f"{r['speedup']:6.2f} {r['kv_GBps']:8.1f} {r['max_abs_err']:8.1e}")
    return rows


if __name__ == "__main__":
    main()
