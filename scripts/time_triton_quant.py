"""Time the Triton W4A16/W8A16 kernels against bf16 cuBLAS on one GPU, side by side in one run.

For each weight shape (default: Llama-3-8B's projections) and each row count M it times the GPU's own
time with `triton.testing.do_bench_cudagraph` (the calls replayed from a CUDA graph, as a decode step
captured in one would run them; Python and launch overhead excluded):
  bf16    torch.nn.functional.linear on the dense bf16 weight (cuBLAS)
  int4    the fused kernel at the split quant_matmul picks (M < dense_min_rows), else dequantize + GEMM
  int4-dq dequantize + GEMM at every M (the other path, to place the crossover)
  int8    as int4, 8-bit codes
and prints the time, the speed-up over bf16 and the weight bandwidth achieved (bytes of the stored
weight / time) against the copy bandwidth measured in the same run; "int4 eager" is the int4 call
timed with `do_bench` (launched from Python each time: what a step outside a CUDA graph pays). Checks each result against the
bf16 product of the dequantized weight before timing it.

    python scripts/time_triton_quant.py --rows 1,4,16,32,64,128,256,512,2048 --json /tmp/q.json

`--sweep` first times candidate kernels and tile sizes (int4) at a few row counts on every shape and
prints each one's total time over the shapes, best first: how `choose_config`'s defaults were picked.
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


SWEEP = {  # rows: candidate configs for quant_matmul(config=...)
    1: [dict(kernel="gemv", BLOCK_N=n, BLOCK_K=k, num_warps=w) for n, k, w in
        ((64, 512, 4), (64, 256, 4), (128, 512, 8), (32, 512, 4))]
       + [dict(kernel="dot", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)],
    4: [dict(kernel="dot", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4),
        dict(kernel="dot", BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4)],
    16: [dict(kernel="dot", BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=w) for n, k, w in
         ((128, 128, 4), (64, 128, 4), (128, 256, 8))],
}


def sweep(packed_by_shape: dict, dev, results: dict) -> None:
    import triton.testing

    from slimlm.serve.kernels.quant_triton import quant_matmul

    for m, configs in SWEEP.items():
        totals = []
        for cfg in configs:
            total, bf16_total = 0.0, 0.0
            for name, (w, w_dense) in packed_by_shape.items():
                x = torch.randn(m, w.in_features, dtype=torch.bfloat16, device=dev)
                ref = F.linear(x, w_dense).float()
                err = ((quant_matmul(x, w, config=cfg).float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, f"{cfg} M={m} {name}: relative error {err:.2e}"
                total += triton.testing.do_bench_cudagraph(lambda: quant_matmul(x, w, config=cfg))
                bf16_total += triton.testing.do_bench_cudagraph(lambda: F.linear(x, w_dense))
            totals.append((total, bf16_total, cfg))
        totals.sort(key=lambda t: t[0])
        for total, bf16_total, cfg in totals:
            print(f"sweep M={m:3d}: {total * 1e3:8.1f} us over the shapes ({bf16_total / total:4.2f}x bf16)  {cfg}",
                  flush=True)
            results.setdefault("sweep", []).append({"M": m, "us": total * 1e3, "bf16_us": bf16_total * 1e3,
                                                    "config": cfg})


def main() -> None:
    import triton.testing

    from slimlm.serve.kernels.quant_triton import dequantize, pack_for_triton, quant_matmul

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,32,64,128,256,512,2048")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time candidate configs first (int4)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this script times GPU kernels: no CUDA device here"
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator(device="cpu").manual_seed(0)

    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB copy: the bandwidth ceiling
    copy_ms = triton.testing.do_bench(lambda: buf[: 1 << 29].copy_(buf[1 << 29:]))
    peak = 2 * (1 << 29) / copy_ms / 1e6  # GB/s, bytes read + written
    del buf
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {peak:.0f} GB/s (read + write)")
    results = {"device": torch.cuda.get_device_name(), "copy_gb_s": peak, "group_size": args.group_size, "rows": []}
    if args.sweep:
        packed = {}
        for name, (n, k) in SHAPES.items():
            codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            scales = (torch.rand(n, k // args.group_size, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
            zeros = torch.randint(0, 16, (n, k // args.group_size), generator=g, dtype=torch.uint8)
            w = pack_for_triton(codes, scales, zeros, args.group_size, 4, torch.bfloat16, dev)
            packed[name] = (w, dequantize(w))
        sweep(packed, dev, results)
        del packed
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
                w_dense = dequantize(packed[bits])  # the bf16 baseline multiplies a weight of the same size
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
