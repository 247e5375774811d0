"""Greedy decode timing of slimlm's model code against HF `generate`, run by hand (not collected by pytest):

    .venv/bin/python scripts/time_decode.py --real [--dtypes fp32,bf16] [--batch-sizes 1,32]
        [--hf-batch-sizes 1,16] [--prompt-len 128] [--new 128] [--reps 3] [--threads N]
    .venv/bin/python scripts/time_decode.py            # random weights, no download (see below)

--real loads SmolLM2-135M-Instruct (`slimlm.toolkit.models.load("smollm2-135m")`; bf16 is that model
cast with `.to(torch.bfloat16)`) and builds prompts of --prompt-len tokens from the built-in wiki
validation text. Without --real, two random-weight models stand in (no download): "overhead", 30
layers of width 64, where nearly all time is Python and op dispatch, and SmolLM2-135M's shapes.

Each row is one way of generating --new tokens for a batch of prompts, prefill included:
  * ours bB: B sequences through `CausalLM` over a paged KV cache, the way the engine drives it:
    prompts prefilled several to a step (at most 2048 tokens), then one decode step for all B
    sequences per token; greedy = argmax of float32 logits, as the sampler does.
  * HF bB: `generate(do_sample=False)` on the same B prompts as one padded batch (equal lengths).
Rows alternate within each repetition (after a warm-up round), so a noisy neighbour hits all of
them; reported as aggregate new tokens/s, median [min, max] of --reps, and for ours also the
decode steps alone (prefill excluded). Ratios are of medians. "same" counts, per prompt, how many
leading tokens ours bB and HF agree on (HF's largest batch not above B); in fp32 they should be all.
On a shared 2-core machine, --threads 1 avoids the multi-millisecond stalls of a parallel region
waiting for a descheduled thread; compare thread counts in separate runs. A/B slimlm's own speed-ups
with SLIMLM_CPU_KERNELS=0 (no C kernels) and SLIMLM_PACK_LINEAR=0 (plain F.linear).

The HF rows take minutes (fp32 HF b16 ~15 s a repetition): `--hf-batch-sizes ''` skips them, and
`--new 32 --reps 1` makes a quick check.
"""
import argparse
import random
import statistics
import time

import torch

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.models import load_model

BLOCK = 16
TOKEN_BUDGET = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Runner:
    """Drives a `CausalLM` like the engine: a shuffled block pool, batched prefill, then batched decode."""

    def __init__(self, model, max_seqs, max_len):
        self.model = model
        per_seq = -(-max_len // BLOCK)
        self.caches = model.allocate_kv_cache(max_seqs * per_seq, BLOCK)
        ids = list(range(max_seqs * per_seq))
        random.Random(0).shuffle(ids)  # a sequence's blocks are scattered, as after some serving
        self.tables = [ids[i * per_seq:(i + 1) * per_seq] for i in range(max_seqs)]

    def step(self, chunks):
        """chunks: [(seq index, tokens cached, new token ids)] -> next greedy token of each sequence."""
        ids, pos, q_lens, s_lens, tables = [], [], [], [], []
        for s, cached, new in chunks:
            ids += new
            pos += range(cached, cached + len(new))
            q_lens.append(len(new))
            s_lens.append(cached + len(new))
            tables.append(self.tables[s][:-(-(cached + len(new)) // BLOCK)])
        meta = AttentionMetadata.build(q_lens, s_lens, tables, BLOCK)
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.caches, meta)
        logits = self.model.compute_logits(hidden[meta.last_token_indices])
        return logits.float().argmax(-1).tolist()

    def generate(self, prompts, new_tokens):
        """Greedy; returns (new tokens per prompt, seconds in decode steps)."""
        seqs = [list(p) for p in prompts]
        group: list[int] = []
        for i in range(len(seqs) + 1):  # prefill whole prompts, as many per step as the budget allows
            if group and (i == len(seqs) or sum(len(seqs[j]) for j in group) + len(seqs[i]) > TOKEN_BUDGET):
                for j, tok in zip(group, self.step([(j, 0, seqs[j]) for j in group])):
                    seqs[j].append(tok)
                group = []
            if i < len(seqs):
                group.append(i)
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            chunks = [(j, len(s) - 1, s[-1:]) for j, s in enumerate(seqs)]
            for s, tok in zip(seqs, self.step(chunks)):
                s.append(tok)
        return [s[len(p):] for s, p in zip(seqs, prompts)], time.perf_counter() - t


def hf_generate(hf, prompts, new_tokens):
    with torch.inference_mode():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                          dtype=torch.long), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, len(prompts[0]):].tolist(), None


def real_prompts(tokenizer, n, length):
    """n prompts of `length` tokens cut from the built-in wiki validation text (random ids if unavailable)."""
    try:
        from slimlm.toolkit.data.builtin import builtin_documents
        ids = []
        for doc in builtin_documents("wiki", "validation"):
            ids += tokenizer(doc)["input_ids"]
            if len(ids) >= n * length:
                break
        if len(ids) >= n * length:
            return [ids[i * length:(i + 1) * length] for i in range(n)]
    except Exception as e:  # noqa: BLE001 - timing still works on random ids
        print(f"(no wiki text: {e}; random prompts)")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (n, length), generator=gen).tolist()


def fmt(xs):
    return f"{statistics.median(xs):8.1f} [{min(xs):7.1f}, {max(xs):7.1f}]"


def compare(name, hf, dtype, prompts, args):
    hf = hf.to(dtype).eval()
    t_load = time.perf_counter()
    model = load_model(hf)
    t_load = time.perf_counter() - t_load
    runner = Runner(model, max(args.batch_sizes), args.prompt_len + args.new)
    rows = {}
    for b in args.batch_sizes:
        rows[f"ours b{b}"] = (b, lambda b=b: runner.generate(prompts[:b], args.new))
    for b in args.hf_batch_sizes:
        rows[f"HF b{b}"] = (b, lambda b=b: hf_generate(hf, prompts[:b], args.new))
    tps = {k: [] for k in rows}
    decode_tps = {k: [] for k in rows}
    outs = {}
    with torch.inference_mode():
        for r in range(args.reps + 1):  # round 0 warms up
            for k, (b, fn) in rows.items():
                t = time.perf_counter()
                out, t_decode = fn()
                t = time.perf_counter() - t
                outs[k] = out
                if r:
                    tps[k].append(b * args.new / t)
                    if t_decode:
                        decode_tps[k].append(b * (args.new - 1) / t_decode)
    print(f"\n{name} {str(dtype)[6:]}: {args.prompt_len}-token prompts, {args.new} new tokens, "
          f"{torch.get_num_threads()} threads, load_model {t_load:.1f} s")
    print(f"  {'row':<10} {'tok/s (prefill incl.)':>28} {'tok/s (decode steps)':>28}  same as HF")
    for k, (b, _) in rows.items():
        same = ""
        hf_bs = sorted(args.hf_batch_sizes)
        if hf_bs and k.startswith("ours"):  # against HF's largest batch not above ours (or its smallest)
            ref = outs[f"HF b{max([h for h in hf_bs if h <= b] or hf_bs[:1])}"]
            agree = []
            for a, b in zip(outs[k], ref):
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
                agree.append(n)
            full = sum(n == args.new for n in agree)
            same = f"{full}/{len(agree)} prompts all {args.new}; min prefix {min(agree)}"
        dec = fmt(decode_tps[k]) if decode_tps[k] else ""
        print(f"  {k:<10} {fmt(tps[k]):>28} {dec:>28}  {same}")
    med = {k: statistics.median(v) for k, v in tps.items()}
    for k in rows:
        if k.startswith("ours"):
            print("  " + "   ".join(f"{k} / {h} = x{med[k] / med[h]:.2f}" for h in rows if h.startswith("HF")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="the real SmolLM2-135M-Instruct (cached locally)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--batch-sizes", default="1", help="ours, comma-separated")
    ap.add_argument("--hf-batch-sizes", default="1", help="HF generate baselines, comma-separated ('' for none)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.hf_batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    n_prompts = max(args.batch_sizes + args.hf_batch_sizes)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    if args.real:
        from slimlm.toolkit.models import load
        prompts = None
        for dtype in dtypes:  # a fresh float32 load per dtype: a cast back from bf16 would lose bits
            hf, tokenizer = load("smollm2-135m")
            prompts = prompts or real_prompts(tokenizer, n_prompts, args.prompt_len)
            compare("SmolLM2-135M", hf, dtype, prompts, args)
        return
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tiny = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    compare("overhead (30x64)", LlamaForCausalLM(tiny), torch.float32,
            torch.randint(1, 259, (n_prompts, args.prompt_len), generator=gen).tolist(), args)
    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, initializer_range=0.2)
    hf = LlamaForCausalLM(smol)
    prompts = torch.randint(1, 49152, (n_prompts, args.prompt_len), generator=gen).tolist()
    for dtype in dtypes:
        compare("smollm2-135m-shape (random)", hf, dtype, prompts, args)


if __name__ == "__main__":
    main()
