"""A model cascade's speed beside its accuracy: a small model answers, the large one takes the unsure prompts.

    python scripts/cascade.py --small DIR [--large smollm2-135m] [--thresholds -0.5,-1,-1.5,-2]
        [--prompts 32] [--prompt-len 64] [--gen 32] [--reps 2] [--dtype bf16] [--threads 2] [--json OUT]

Prompts are the first --prompt-len tokens of consecutive held-out windows (builtin:wiki, validation
split); every prompt runs alone (batch 1, greedy, --gen new tokens) through `serve.cascade.Cascade`.
For each threshold (a mean token logprob of the small model's answer) it reports: the share of prompts
escalated to the large model, the wall time against the large model alone on the same prompts
(interleaved per repetition, median), and the answers' accuracy against the large model's: the share of
answers identical to its greedy answer, the share of answer tokens that match it position by position,
and the answers' perplexity under the large model (teacher-forced; its own greedy answers give the
reference value). No library logic lives here.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from slimlm.serve.cascade import Cascade
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.data import load_texts, token_stream
from slimlm.toolkit.models import load


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.inference_mode()
def answer_perplexity(model, prompts: list[list[int]], answers: list[list[int]]) -> float:
    """exp(mean NLL) of the answer tokens under `model`, each answer after its prompt."""
    nll, count = 0.0, 0
    for p, a in zip(prompts, answers):
        if not a:
            continue
        ids = torch.tensor([p + a])
        logprobs = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), dim=-1)  # [len(a), V]
        nll -= logprobs.gather(1, torch.tensor(a)[:, None]).sum().item()
        count += len(a)
    return math.exp(nll / max(count, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", required=True, help="the small model (e.g. a pruned + distilled export)")
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--thresholds", default="-0.5,-1,-1.5,-2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",")]

    large_hf, tok = load(args.large, dtype=args.dtype)
    small_hf, _ = load(args.small, dtype=args.dtype)
    large, small = LLM(large_hf, tok), LLM(small_hf, tok)
    stream = token_stream(load_texts("builtin:wiki", split="validation", tokenizer=tok), tok)
    prompts = [stream[i * 512:i * 512 + args.prompt_len].tolist() for i in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)

    def alone(llm):
        return [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]

    def cascaded(t):
        c = Cascade(small, large, t)
        return [c.generate(p, params)[0] for p in prompts]

    alone(large), alone(small)  # warm-up
    times: dict[str, list[float]] = {"large": [], "small": [], **{str(t): [] for t in thresholds}}
    results = {}
    for _ in range(args.reps):
        reference, seconds = timed(lambda: alone(large))
        times["large"].append(seconds)
        small_answers, seconds = timed(lambda: alone(small))
        times["small"].append(seconds)
        for t in thresholds:
            results[t], seconds = timed(lambda t=t: cascaded(t))
            times[str(t)].append(seconds)

    hf = large_hf.float()
    ref_ppl = answer_perplexity(hf, prompts, reference)
    large_time = statistics.median(times["large"])

    def quality(answers):
        exact = sum(a == r for a, r in zip(answers, reference)) / len(prompts)
        tokens = sum(x == y for a, r in zip(answers, reference) for x, y in zip(a, r)) / sum(map(len, reference))
        return {"identical_answers": round(exact, 4), "matching_tokens": round(tokens, 4),
                "perplexity_under_large": round(answer_perplexity(hf, prompts, answers), 3)}

    rows = [{"run": "large alone", "escalated": 1.0, "speedup": 1.0, "identical_answers": 1.0, "matching_tokens": 1.0,
             "perplexity_under_large": round(ref_ppl, 3)},
            {"run": "small alone", "escalated": 0.0, "speedup": round(large_time / statistics.median(times["small"]), 3),
             **quality(small_answers)}]
    for t in thresholds:
        answers = [r.output.outputs[0].token_ids for r in results[t]]
        escalated = sum(r.answered_by == "large" for r in results[t]) / len(prompts)
        rows.append({"run": f"cascade, threshold {t}", "escalated": round(escalated, 4),
                     "speedup": round(large_time / statistics.median(times[str(t)]), 3), **quality(answers)})
    print(f"{len(prompts)} prompts of {args.prompt_len} tokens, {args.gen} new tokens, batch 1, greedy; "
          f"large {args.large}, small {args.small}; speedup = large-alone time / run time (median of {args.reps})")
    print("| run | escalated | speedup | identical answers | matching tokens | perplexity under large |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['escalated']:.0%} | {r['speedup']:.2f}x | {r['identical_answers']:.0%} | "
              f"{r['matching_tokens']:.0%} | {r['perplexity_under_large']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "times": times}, fh, indent=1)


if __name__ == "__main__":
    main()
