"""Per-layer timings of `QuantLinear` (int4 g64, int8 g64) against the bf16 `PackedLinear`, run by hand:

    .venv/bin/python scripts/time_quant_linear.py [--rows 1 4 16 32 64 256] [--threads 1 2] [--reps 7]
        [--layers qkv_proj o_proj gate_up_proj down_proj lm_head] [--working-set-mb 96] [--paths]
        [--baselines] [--clock wall|cpu] [--stat median|min]

Shapes are SmolLM2-135M's as `serve.models.llama` builds them: q/k/v fused (9 + 2 x 3 heads of 64 =
960 rows), gate/up fused (2 x 1536), down, o, and the tied LM head (vocab 49152); random weights
and codes (uniform), asymmetric zeros, fp16 scales. Each layer is held in enough copies that one
pass over them exceeds --working-set-mb (the L3 is 32 MB): the weights stream from memory, as in a
decode step over 30 layers, rather than from cache. Every repetition times each variant once over
its copies, variants interleaved (a noisy neighbour hits all of them), each call timed alone;
reported: the median (or --stat min) microseconds per call over all of them, the int4/int8 speed-up
over bf16 (ratio of medians), and at one row the weight bytes streamed per second.
--paths adds both int4/int8 kernels forced (exact GEMV, dequantize-then-GEMM) to find the crossover
that `gemm_min_rows` encodes; --baselines adds PyTorch's int4 CPU matmul and F.linear on an unpacked
bf16 weight (what dequantize-then-oneDNN costs, less the dequantization). With every layer timed, a
last line adds up one decode step's projections at M = 1.
On a shared 2-core machine the wall clock counts the time neighbours hold the cores; --clock cpu
counts this process's CPU time instead, divided by the threads: at one thread the time the thread
ran, steady under load; at two it miscounts (a thread asleep in OpenMP's barrier counts nothing), so
for two threads use the wall clock and look at --stat min too.
"""
import argparse
import dataclasses
import math
import statistics
import time

import torch

from slimlm.serve.kernels.quant_cpu import qgemm_bf16, qgemv, unpack_codes
from slimlm.serve.layers.linear import PackedLinear
from slimlm.serve.layers.quant_linear import QuantLinear, gemm_min_rows

SHAPES = {"qkv_proj": (960, 576), "o_proj": (576, 576), "gate_up_proj": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}


def quant_layer(out_f: int, in_f: int, bits: int, gs: int = 64) -> QuantLinear:
    g = torch.Generator().manual_seed(out_f + bits)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // gs, generator=g) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, 1 << bits, (out_f, in_f // gs), generator=g, dtype=torch.uint8)
    return QuantLinear.from_codes(codes, scales, zeros, gs, bits)


def copies_of(layer: QuantLinear, n: int) -> list[QuantLinear]:
    clone = lambda: dataclasses.replace(layer.packed, **{k: getattr(layer.packed, k).clone()  # noqa: E731
                                                        for k in ("codes", "scales", "zeros")})
    return [layer] + [QuantLinear(clone(), None, layer.act_dtype) for _ in range(n - 1)]


def n_copies(nbytes: int, working_set: int) -> int:
    return max(2, math.ceil(working_set / nbytes))


def torch_int4(layer: QuantLinear):
    """PyTorch's CPU int4 matmul on the same weight: its layout, and (q - 8) * s + m with m = (8 - z) * s."""
    codes, scales, zeros = unpack_codes(layer.packed)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros.float()) * s], dim=-1).transpose(0, 1).bfloat16().contiguous()  # [G, out, 2]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2), sz, layer.group_size


def variants(out_f: int, in_f: int, working_set: int, paths: bool, baselines: bool) -> dict[str, tuple]:
    """name -> (modules, weight bytes of one, call(module, x))."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)).bfloat16()
    dense_bytes = out_f * in_f * 2
    out = {"bf16": ([PackedLinear(w.clone()) for _ in range(n_copies(dense_bytes, working_set))], dense_bytes,
                    lambda mod, x: mod(x))}
    if baselines:  # F.linear on a plain bf16 weight: the GEMM half of dequantize-then-oneDNN, a lower bound
        out["F.linear"] = ([w.clone() for _ in range(n_copies(dense_bytes, working_set))], dense_bytes,
                           lambda w, x: torch.nn.functional.linear(x, w))
    for bits in (4, 8):
        layer = quant_layer(out_f, in_f, bits)
        nbytes = layer.packed.nbytes()
        mods = copies_of(layer, n_copies(nbytes, working_set))
        out[f"int{bits}"] = (mods, nbytes, lambda mod, x: mod(x))
        if baselines and bits == 4:
            t4 = [torch_int4(mod) for mod in mods]
            int4mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            out["torch int4"] = (t4, nbytes, lambda t, x: int4mm(x, t[0], t[2], t[1]))
        if paths:
            threads = lambda: torch.get_num_threads()  # noqa: E731
            out[f"int{bits} gemv"] = (mods, nbytes, lambda m, x: qgemv(m._lib, m.packed, x, None, threads()))
            out[f"int{bits} gemm"] = (mods, nbytes, lambda m, x: qgemm_bf16(m._lib, m.packed, x, None, threads()))
    return out


def time_all(vs: dict, x: torch.Tensor, reps: int, clock) -> dict[str, list[float]]:
    """Seconds of every call of each variant: `reps` passes over its copies, variants interleaved, after
    one warm-up pass. Calls are timed one by one, so a call a neighbour interrupts is one sample, not a
    whole repetition."""
    times = {name: [] for name in vs}
    for rep in range(reps + 1):
        for name, (mods, _, call) in vs.items():
            for mod in mods:
                t0 = clock()
                call(mod, x)
                if rep:
                    times[name].append(clock() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--working-set-mb", type=float, default=96)
    ap.add_argument("--paths", action="store_true", help="also time both quantized kernels forced at every M")
    ap.add_argument("--baselines", action="store_true",
                    help="also PyTorch's _weight_int4pack_mm_for_cpu and F.linear on an unpacked bf16 weight")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time divided by the thread count (see the module doc)")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="of all timed calls")
    args = ap.parse_args()
    if not quant_layer(64, 64, 4).uses_kernel:
        print("note: the C kernel is unavailable here; the quantized rows time the PyTorch fallback")
    print(f"GEMM from int4 {gemm_min_rows(4)}, int8 {gemm_min_rows(8)} rows; {args.clock} clock; "
          f"{args.stat} of {args.reps} passes over the copies, "
          "microseconds per call; "
          "(x N) = bf16 time / this time; GB/s = weight bytes / time")
    for threads in args.threads:
        torch.set_num_threads(threads)
        one_row = {}  # layer -> {variant: seconds at M = 1}
        clock = time.perf_counter if args.clock == "wall" else (lambda t=threads: time.process_time() / t)
        for layer in args.layers:
            out_f, in_f = SHAPES[layer]
            vs = variants(out_f, in_f, int(args.working_set_mb * 2 ** 20), args.paths, args.baselines)
            names = list(vs)
            print(f"\n{layer} [{out_f} x {in_f}], {threads} thread(s); bytes: " +
                  ", ".join(f"{n} {vs[n][1] / 2 ** 20:.2f} MiB" for n in names if " " not in n))
            print(f"{'M':>5} " + " ".join(f"{n:>22}" for n in names))
            for m in args.rows:
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).bfloat16()
                stat = statistics.median if args.stat == "median" else min
                med = {n: stat(t) for n, t in time_all(vs, x, args.reps, clock).items()}
                if m == 1:
                    one_row[layer] = med
                cells = []
                for n in names:
                    cell = f"{med[n] * 1e6:9.1f}"
                    if n != "bf16":
                        cell += f" (x{med['bf16'] / med[n]:4.2f})"
                    if m == 1:
                        cell += f" {vs[n][1] / med[n] / 1e9:4.0f}GB/s"
                    cells.append(f"{cell:>22}")
                print(f"{m:>5} " + " ".join(cells), flush=True)
        if set(one_row) == set(SHAPES):  # SmolLM2-135M: 30 layers of four projections, then the LM head
            step = {n: sum(30 * one_row[k][n] for k in SHAPES if k != "lm_head") + one_row["lm_head"][n]
                    for n in one_row["lm_head"]}
            print(f"\none decode step's projections at M = 1 (30 layers + LM head), {threads} thread(s): " +
                  ", ".join(f"{n} {t * 1e3:.2f} ms (x{step['bf16'] / t:.2f})" for n, t in step.items()))


if __name__ == "__main__":
    main()
