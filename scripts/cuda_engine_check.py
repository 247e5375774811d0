"""Check and time slimlm's serving engine on a CUDA GPU, with random-weight models (no hub, no data).

1. Correctness (float32, tiny Llama and Qwen2): the engine's greedy outputs (Triton paged attention,
   Triton int4 kernels for a GPTQ folder) against transformers' `generate` on the same model, token
   for token; the RTN int4 folder against the HF model holding its dequantized weights.
   Decode steps replay CUDA graphs (the engine's default on CUDA); the same prompts also run with
   graphs off (`cuda_graphs=False`), and the first two alone (the batch-1 graph).
2. Speed (bf16, a random model of the shape given, default ~0.4B: hidden 2048, 8 layers): generated
   tokens/s of the engine at each batch size, for the bf16 model, its RTN int4 g128 GPTQ folder, each
   with CUDA graphs and eager, bf16 without the compiled elementwise kernels (SLIMLM_COMPILE=0), the
   eager bf16 model with the PyTorch attention path (SLIMLM_TRITON=0), and transformers' `generate`,
   interleaved per repetition (median of --reps).

    python scripts/cuda_engine_check.py --batch-sizes 1,16,64 --json /tmp/engine.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from slimlm.serve.bench import run_engine, run_hf
from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import load
from slimlm.toolkit.models.tiny import byte_tokenizer, tiny_model
from slimlm.toolkit.quant.calibrate import quantize_model
from slimlm.toolkit.quant.gptq_format import save_gptq
from slimlm.toolkit.quant.scheme import QuantScheme


def greedy_engine(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[str(i)] for i in range(len(prompts))]


def greedy_hf(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        with torch.inference_mode():
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)  # past EOS, as ignore_eos
        outs.append(g[0, len(p):].tolist())
    return outs


def int4_folder(model, tok, group_size: int, out: str) -> str:
    scheme = QuantScheme(bits=4, group_size=group_size, sym=False)
    state = quantize_model(model, scheme, method="rtn", progress=False)
    return str(save_gptq(model, tok, state, scheme, out, overwrite=True))


def check_correctness(tmp: str, dev: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 23, 40, 77, 130)]
    result = {}
    for arch in ("llama", "qwen2"):
        model, tok = tiny_model(arch, num_hidden_layers=3, hidden_size=128, intermediate_size=256,
                                num_attention_heads=8, num_key_value_heads=2)
        model = model.to(dev)
        engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=8, num_blocks=256))
        got, want = greedy_engine(engine, prompts, 32), greedy_hf(model, prompts, 32)
        same = sum(a == b for a, b in zip(got, want))
        graphs = engine.runner.graphs
        result[f"{arch} fp32 greedy identical (CUDA graphs: {graphs.steps if graphs else 0} replays)"] = \
            f"{same}/{len(prompts)}"
        one = [greedy_engine(engine, [p], 32)[0] for p in prompts[:2]]  # batch 1: the bucket-1 graph
        result[f"{arch} fp32 batch-1 greedy identical"] = f"{sum(a == b for a, b in zip(one, want))}/2"
        params = SamplingParams(temperature=0, n=3, max_tokens=32, ignore_eos=True)  # forks share the prompt's blocks
        engine.add_request("n3", prompts[3], params)
        while engine.has_unfinished():
            forked = [list(c.token_ids) for o in engine.step() if o.finished for c in o.outputs] or None
        result[f"{arch} fp32 n=3 forks greedy identical"] = f"{sum(f == want[3] for f in forked)}/3"
        eager = LLMEngine(model, tok, EngineConfig(max_num_seqs=8, num_blocks=256, cuda_graphs=False))
        same = sum(a == b for a, b in zip(greedy_engine(eager, prompts, 32), want))
        result[f"{arch} fp32 greedy identical, eager"] = f"{same}/{len(prompts)}"
        folder = int4_folder(model.cpu(), tok, 64, os.path.join(tmp, f"{arch}-int4"))
        qmodel, qtok = load(folder, dtype="float32", device=dev)
        engine = LLMEngine(qmodel, qtok, EngineConfig(max_num_seqs=8, num_blocks=256))
        kinds = sorted({type(m).__name__ for m in engine.model.modules() if "Quant" in type(m).__name__})
        same = sum(a == b for a, b in zip(greedy_engine(engine, prompts, 32), greedy_hf(qmodel, prompts, 32)))
        result[f"{arch} int4 greedy identical ({', '.join(kinds) or 'no quantized layers'})"] = f"{same}/{len(prompts)}"
        print(result, flush=True)
    return result


def time_engines(args, tmp: str) -> dict:
    dev = args.device
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tok = byte_tokenizer()
    folder = int4_folder(model.float().cpu(), tok, 128, os.path.join(tmp, "medium-int4"))  # packing runs on CPU
    model = model.to(device=dev, dtype=torch.bfloat16)
    qmodel, _ = load(folder, dtype="bf16", device=dev)
    params = sum(p.numel() for p in model.parameters())
    cap = max(args.batch_sizes)
    config = lambda **kw: EngineConfig(max_num_seqs=cap, kv_cache_gb=args.kv_cache_gb, **kw)  # noqa: E731
    # name -> (engine, SLIMLM_COMPILE, SLIMLM_TRITON). A graph keeps the kernels of its capture, so a setting that
    # changes them gets an engine of its own; eager engines follow the variables at every call.
    eager_bf16 = LLMEngine(model, tok, config(cuda_graphs=False))
    engines = {"bf16": (LLMEngine(model, tok, config()), "1", "1"),
               "bf16 no-compile": (LLMEngine(model, tok, config()), "0", "1"),
               "int4": (LLMEngine(qmodel, tok, config()), "1", "1"),
               "bf16-eager": (eager_bf16, "1", "1"),
               "int4-eager": (LLMEngine(qmodel, tok, config(cuda_graphs=False)), "1", "1"),
               "bf16-eager torch-attention": (eager_bf16, "0", "0")}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (args.prompt_len,), generator=gen).tolist() for _ in range(cap)]
    table = {"model": f"random Llama {params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers)",
             "prompt_len": args.prompt_len, "gen_len": args.gen_len, "device": torch.cuda.get_device_name() if dev == "cuda" else dev}
    for b in args.batch_sizes:
        runs = {name: [] for name in [*engines, "hf bf16"]}
        for rep in range(args.reps + 1):  # the first is a warm-up (Triton compiles, cuBLAS picks)
            for name in runs:
                if name == "hf bf16" and (args.skip_hf or b > 16):
                    continue
                if dev == "cuda":
                    torch.cuda.synchronize()
                if name == "hf bf16":
                    value = run_hf(model, prompts[:b], args.gen_len, 0)
                else:
                    engine, os.environ["SLIMLM_COMPILE"], os.environ["SLIMLM_TRITON"] = engines[name]
                    value = run_engine(engine, prompts[:b], args.gen_len).tokens_per_s
                if rep:
                    runs[name].append(value)
        os.environ["SLIMLM_COMPILE"] = os.environ["SLIMLM_TRITON"] = "1"
        row = {name: statistics.median(v) for name, v in runs.items() if v}
        table[f"batch {b}"] = row
        print(f"batch {b}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items())
              + f"; int4/bf16 {row['int4'] / row['bf16']:.2f}x, graphs/eager bf16 {row['bf16'] / row['bf16-eager']:.2f}x"
              f" int4 {row['int4'] / row['int4-eager']:.2f}x, compiled/plain elementwise in the graphs "
              f"{row['bf16'] / row['bf16 no-compile']:.2f}x", flush=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kv-cache-gb", type=float, default=4.0, help="KV cache of each of the 6 engines (default 4)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    assert args.device != "cuda" or torch.cuda.is_available(), "this script checks the CUDA path: no CUDA device here"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"correctness": check_correctness(tmp, args.device)}
        if not args.skip_speed:
            result["speed"] = time_engines(args, tmp)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
