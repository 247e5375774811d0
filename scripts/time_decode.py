"""Batch-1 greedy decode timing, run by hand (not collected by pytest):

    .venv/bin/python scripts/time_decode.py [--reps 3] [--new 32] [--threads N]

Two models, random weights (no download), each against HF `generate(do_sample=False)` on the same
prompt in the same run:
  * "overhead": 30 layers of a tiny width (hidden 64): nearly all time is Python and op dispatch.
  * "smollm2-135m-shape": SmolLM2-135M's shapes (30 layers, hidden 576, 9/3 heads, MLP 1536,
    vocab 49152, tied), in fp32 and bf16.
Reports ms per generated token (prefill included, as in generate) as median [min, max] of --reps;
ours and HF alternate, so a noisy neighbour hits both. "same tokens" checks greedy identity; in bf16
it is not expected on these random weights (wide init, so logits are chaotic: HF's own bf16 run
disagrees with fp32 as much as ours does). On a shared 2-core machine, --threads 1
avoids the multi-millisecond stalls of a parallel region waiting for a descheduled thread.
"""
import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.models import load_model

BLOCK = 16


DECODE_MS = []  # per call of ours_generate: ms per decode step, prefill excluded


def ours_generate(model, prompt, new_tokens):
    caches = model.allocate_kv_cache(64, BLOCK)
    table = list(range(63, -1, -1))  # reversed: blocks deliberately non-contiguous in memory order
    seq, cached, out = list(prompt), 0, []
    with torch.inference_mode():
        for step in range(new_tokens):
            if step == 1:
                t_decode = time.perf_counter()
            new = seq[cached:]
            n = len(seq)
            meta = AttentionMetadata.build([len(new)], [n], [table[:-(-n // BLOCK)]], BLOCK)
            hidden = model(torch.tensor(new), torch.arange(cached, n), caches, meta)
            tok = int(model.compute_logits(hidden[-1:]).argmax(-1))
            cached = n
            seq.append(tok)
            out.append(tok)
    DECODE_MS.append(1000 * (time.perf_counter() - t_decode) / (new_tokens - 1))
    return out


def hf_generate(hf, prompt, new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def timed(fns, reps):
    """Run each of `fns` once to warm up, then `reps` rounds alternating between them."""
    results = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return results, times


def report(name, hf, reps, new_tokens, dtype):
    hf = hf.to(dtype).eval()
    model = load_model(hf)
    prompt = list(range(1, 33))
    (ours, ref), (t_ours, t_hf) = timed([lambda: ours_generate(model, prompt, new_tokens),
                                        lambda: hf_generate(hf, prompt, new_tokens)], reps)
    ms = lambda ts: [1000 * t / new_tokens for t in ts]  # noqa: E731
    fmt = lambda ts: f"{statistics.median(ms(ts)):6.2f} [{min(ms(ts)):6.2f}, {max(ms(ts)):6.2f}]"  # noqa: E731
    same = sum(a == b for a, b in zip(ours, ref))
    decode = DECODE_MS[-reps:]
    print(f"{name:<19} {str(dtype)[6:]:<8} ours {fmt(t_ours)} ms/tok (decode steps alone "
          f"{statistics.median(decode):.2f} [{min(decode):.2f}, {max(decode):.2f}])   HF generate {fmt(t_hf)} ms/tok   "
          f"speedup x{statistics.median(t_hf) / statistics.median(t_ours):.2f}   same tokens {same}/{new_tokens}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-smol", action="store_true", help="only the overhead model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    tiny = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    report("overhead (30x64)", LlamaForCausalLM(tiny), args.reps, args.new, torch.float32)
    if args.skip_smol:
        return
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.2)
    hf = LlamaForCausalLM(smol)
    for dtype in (torch.float32, torch.bfloat16):
        report("smollm2-135m-shape", hf, args.reps, args.new, dtype)


if __name__ == "__main__":
    main()
