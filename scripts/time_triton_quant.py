"""Time the Triton W4A16/W8A16 kernels against bf16 cuBLAS on one GPU, side by side in one run; tune them.

For each weight shape (default: Llama-3-8B's projections) and each row count M it times the GPU's own
time with `triton.testing.do_bench_cudagraph` (the calls replayed from a CUDA graph, as a decode step
captured in one would run them; Python and launch overhead excluded):
  bf16    torch.nn.functional.linear on the dense bf16 weight (cuBLAS)
  int4    quant_matmul as the engine calls it (this GPU's tuned table, or the built-in defaults)
  int4-dq dequantize + GEMM at every M from 16 (the dense path, to place the crossover)
  int8    as int4, 8-bit codes
and prints the time, the speed-up over bf16 and the weight bandwidth achieved (bytes of the stored
weight / time) against the copy bandwidth measured in the same run; "int4 eager" is the int4 call
timed with `do_bench` (launched from Python each time: what a step outside a CUDA graph pays). Checks
each result against the bf16 product of the dequantized weight before timing it.

    python scripts/time_triton_quant.py --json /tmp/q.json

`--sweep` first times the candidate kernels and tiles of SWEEP (int4 g128) at each row count over all
shapes and prints each one's total, best first; `--write-configs PATH` saves the fastest per row count
as a table that `quant_matmul` follows (copy it to serve/kernels/tuned/ under the name
`quant_triton.tuned_file` gives for the GPU, or point $SLIMLM_TRITON_QUANT_CONFIGS at it). Compiling
the candidates is CPU work, so compile them in parallel processes first:

    for i in 0 1 2 3 4 5 6 7; do python scripts/time_triton_quant.py --sweep --warm-part $i/8 & done; wait
    python scripts/time_triton_quant.py --sweep --write-configs /tmp/tuned.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # name: (out, in)
    "qkv 6144x4096": (6144, 4096),
    "o 4096x4096": (4096, 4096),
    "gate_up 28672x4096": (28672, 4096),
    "down 4096x14336": (4096, 14336),
}


def _gemv(n, k, w=4, stages=3):
    return dict(kernel="gemv", BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=stages)


def _dot(m, n, k, w=4, late=False, stages=3, path="per-code"):
    # path: "per-code" (a tl.dot per code position of the words), "reshape" or "gather" (one [BK, BN] tile)
    return dict(kernel="dot", BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=stages, LATE_SCALE=late,
                PER_CODE=path == "per-code", GATHER=path == "gather")


def _tile(m, n, k, w=4, path="gather", stages=3):
    return _dot(m, n, k, w, True, stages, path)


DENSE = dict(kernel="dense")  # dequantize once, then cuBLAS
SWEEP = {  # rows: candidate configs (int4 g128) for quant_matmul(config=...)
    1: [_gemv(32, 512)],
    2: [_dot(16, 64, 128), _tile(16, 64, 128), _tile(16, 128, 128), _tile(16, 64, 64), _tile(16, 64, 128, path="reshape")],
    4: [_dot(16, 64, 128, late=True), _tile(16, 64, 128), _tile(16, 128, 128), _tile(16, 64, 64),
        _tile(16, 64, 128, path="reshape")],
    8: [_dot(16, 64, 128, late=True), _tile(16, 64, 128), _tile(16, 128, 128), _tile(16, 64, 64)],
    16: [_dot(16, 128, 128, late=True), _tile(16, 64, 128), _tile(16, 128, 128), _tile(16, 128, 64),
         _tile(16, 128, 128, path="reshape")],
    32: [DENSE, _tile(32, 128, 128), _tile(32, 64, 128), _tile(32, 128, 64)],
    64: [DENSE, _tile(64, 128, 128), _tile(64, 64, 128), _tile(64, 128, 64, 8)],
    128: [DENSE, _tile(64, 128, 128), _tile(128, 128, 64, 8), _tile(128, 128, 128, 8)],
    256: [DENSE, _tile(128, 128, 64, 8), _tile(128, 256, 64, 8), _tile(64, 128, 128)],
    1024: [DENSE, _tile(128, 128, 64, 8), _tile(128, 256, 64, 8)],
    4096: [DENSE, _tile(128, 256, 64, 8)],
}


def _call(x, w, cfg):
    from slimlm.serve.kernels.quant_triton import quant_matmul

    if cfg["kernel"] == "dense":
        return quant_matmul(x, w, dense_min_rows=0)
    return quant_matmul(x, w, config=cfg)


def sweep(packed_by_shape: dict, dev, results: dict, part: tuple[int, int] | None = None) -> dict:
    """Time every candidate of SWEEP; returns {rows: the fastest config}. `part` (i, n): only check the
    i-th of n slices of the candidates, untimed (compiles them into Triton's cache, in parallel processes)."""
    import triton
    import triton.testing

    best = {}
    jobs = [(m, cfg) for m, configs in SWEEP.items() for cfg in configs]
    bf16 = {}
    for m in SWEEP:
        for name, (w, w_dense) in packed_by_shape.items():
            x = torch.randn(m, w.in_features, dtype=torch.bfloat16, device=dev)
            bf16[m, name] = (x, None if part else triton.testing.do_bench_cudagraph(lambda: F.linear(x, w_dense)))
    totals = {}
    for i, (m, cfg) in enumerate(jobs):
        if part and i % part[1] != part[0]:
            continue
        total = 0.0
        for name, (w, w_dense) in packed_by_shape.items():
            x = bf16[m, name][0]
            ref = F.linear(x, w_dense).float()
            try:
                y = _call(x, w, cfg)
            except triton.runtime.errors.OutOfResources as e:  # a tile too large for this GPU: not a candidate
                print(f"sweep M={m:4d}: skipped {cfg}: {e}", flush=True)
                total = float("inf")
                break
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-2, f"{cfg} M={m} {name}: relative error {err:.2e}"
            if not part:
                total += triton.testing.do_bench_cudagraph(lambda: _call(x, w, cfg))
        totals.setdefault(m, []).append((total, cfg))
    if part:
        return {}
    for m, cands in totals.items():
        bf16_total = sum(t for (mm, _), (_, t) in bf16.items() if mm == m)
        cands = sorted((c for c in cands if c[0] < float("inf")), key=lambda c: c[0])
        best[m] = cands[0][1]
        for total, cfg in cands:
            print(f"sweep M={m:4d}: {total * 1e3:8.1f} us over the shapes ({bf16_total / total:4.2f}x bf16)  {cfg}",
                  flush=True)
            results.setdefault("sweep", []).append({"M": m, "us": total * 1e3, "bf16_us": bf16_total * 1e3,
                                                    "config": cfg})
    return best


def _sweep_weights(g, group_size: int, dev) -> dict:
    from slimlm.serve.kernels.quant_triton import dequantize, pack_for_triton

    packed = {}
    for name, (n, k) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, k // group_size, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (n, k // group_size), generator=g, dtype=torch.uint8)
        w = pack_for_triton(codes, scales, zeros, group_size, 4, torch.bfloat16, dev)
        packed[name] = (w, dequantize(w).contiguous())
    return packed


def main() -> None:
    import triton
    import triton.testing

    from slimlm.serve.kernels.quant_triton import dequantize, pack_for_triton, quant_matmul

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,1024,4096")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time candidate configs first (int4)")
    ap.add_argument("--write-configs", default=None, metavar="PATH",
                    help="with --sweep: write the fastest config per row count as this GPU's table (the engine "
                         "reads it from serve/kernels/tuned/, or from $SLIMLM_TRITON_QUANT_CONFIGS)")
    ap.add_argument("--warm-part", default=None, metavar="I/N",
                    help="with --sweep: only compile and check the I-th of N slices of the candidates, untimed "
                         "(run N of these in parallel first: compiling is CPU work)")
    args = ap.parse_args()
    part = tuple(int(v) for v in args.warm_part.split("/")) if args.warm_part else None
    assert torch.cuda.is_available(), "this script times GPU kernels: no CUDA device here"
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator(device="cpu").manual_seed(0)

    if part:
        sweep(_sweep_weights(g, args.group_size, dev), dev, {}, part)
        return
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB copy: the bandwidth ceiling
    copy_ms = triton.testing.do_bench(lambda: buf[: 1 << 29].copy_(buf[1 << 29:]))
    peak = 2 * (1 << 29) / copy_ms / 1e6  # GB/s, bytes read + written
    buf = None
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {peak:.0f} GB/s (read + write)")
    results = {"device": torch.cuda.get_device_name(), "copy_gb_s": peak, "group_size": args.group_size, "rows": []}
    if args.sweep:
        best = sweep(_sweep_weights(g, args.group_size, dev), dev, results)
        if args.write_configs:
            table = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "measured": f"scripts/time_triton_quant.py --sweep: int4 g{args.group_size} asymmetric, bf16, "
                                 "Llama-3-8B projections; the fastest over the shapes from each row count on",
                     "configs": {str(m): cfg for m, cfg in sorted(best.items())}}
            with open(args.write_configs, "w") as f:
                json.dump(table, f, indent=1)
            print(f"wrote {args.write_configs}")
    for name, (n, k) in SHAPES.items():
        w_dense = None
        packed = {}
        for bits in (4, 8):
            maxq = (1 << bits) - 1
            codes = torch.randint(0, maxq + 1, (n, k), generator=g, dtype=torch.uint8)
            groups = k // args.group_size
            scales = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
            zeros = torch.randint(0, maxq + 1, (n, groups), generator=g, dtype=torch.uint8)
            packed[bits] = pack_for_triton(codes, scales, zeros, args.group_size, bits, torch.bfloat16, dev)
            if w_dense is None:
                w_dense = dequantize(packed[bits]).contiguous()  # bf16 baseline: a weight of the same size
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            row = {"shape": name, "M": m}
            bf16_ms = triton.testing.do_bench_cudagraph(lambda: F.linear(x, w_dense))
            row["bf16_ms"] = bf16_ms
            for label, bits, kw in (("int4", 4, {}), ("int4-dq", 4, {"dense_min_rows": 0}), ("int8", 8, {})):
                if label == "int4-dq" and m < 16:
                    row["int4-dq_speedup"] = float("nan")
                    continue
                w = packed[bits]
                ref = F.linear(x, dequantize(w)).float()
                got = quant_matmul(x, w, **kw).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, f"{name} M={m} {label}: relative error {err:.2e}"
                ms = triton.testing.do_bench_cudagraph(lambda w=w, kw=kw: quant_matmul(x, w, **kw))
                if label == "int4":
                    row["int4_eager_ms"] = triton.testing.do_bench(lambda w=w: quant_matmul(x, w))
                row[f"{label}_ms"] = ms
                row[f"{label}_speedup"] = bf16_ms / ms
                row[f"{label}_gb_s"] = w.nbytes / ms / 1e6
            row["bf16_gb_s"] = w_dense.numel() * 2 / bf16_ms / 1e6
            results["rows"].append(row)
            print(f"{name:20s} M={m:5d}  bf16 {bf16_ms * 1e3:8.1f} us ({row['bf16_gb_s']:5.0f} GB/s)  "
                  f"int4 {row['int4_ms'] * 1e3:8.1f} us {row['int4_speedup']:5.2f}x ({row['int4_gb_s']:5.0f} GB/s)  "
                  f"eager {row['int4_eager_ms'] * 1e3:6.1f} us  int4-dq {row['int4-dq_speedup']:5.2f}x  int8 {row['int8_speedup']:5.2f}x "
                  f"({row['int8_gb_s']:5.0f} GB/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
