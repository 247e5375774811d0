"""Self-speculative decoding on a real model: acceptance by exit layer and draft length, identity, speed.

For each exit layer E and draft length K it generates greedily from held-out prompts with drafting forced
on (adaptive off), and reports the acceptance rate, the mean tokens emitted per speculative step, whether
the output equals plain decoding token for token, and tokens/s against the plain engine in the same run
(with --reps N, the two alternated N times: the median of the per-repetition ratios, with their range).

    python scripts/self_spec.py --model smollm2-135m --exits 6,10,15,20 --drafts 2,4 --prompts 8 --gen 64
    python scripts/self_spec.py --model smollm2-135m --draft-model DIR --drafts 2,4 --adaptive   # a draft model
    python scripts/self_spec.py --exits 20 --drafts 3 --exit-confidence 0.9,0.7,0.5   # lossy: accuracy beside speed
    python scripts/self_spec.py --exits 8 --drafts 3 --draft-head none,int8,int4       # cheaper drafts, lossless
    python scripts/self_spec.py --model runs/early_exit-smollm2-135m-lens/model --exits 4,8   # trained exits
    python scripts/self_spec.py --ngram 3 --drafts 4,8 --adaptive --task quote   # prompt lookup, a copying task
    python scripts/self_spec.py --draft-model DIR --ngram 3 --drafts 2 --adaptive --task summarize  # both

--task quote|summarize: chat prompts asking the model to repeat or sum up a held-out paragraph (outputs that
reuse their input, where prompt lookup pays), generated up to EOS or --gen tokens; the default, continue,
continues held-out text for exactly --gen tokens.

An export with exits of its own (`norm: own` or `lens`) drafts through them at the layers it has them.

With --exit-confidence (lossy, CALM-style) each listed threshold adds a run where a draft token whose
draft probability reaches it is kept even where the full model disagrees; those rows also report the
share of output tokens equal to plain decoding's, position by position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from slimlm.serve.bench import bench_prompts, task_prompts
from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.engine.speculative import SpeculativeConfig
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.early_exit import draft_weights, read_exit_spec
from slimlm.toolkit.models import load, resolve


def generate(engine: LLMEngine, prompts: list[list[int]], gen: int, batch: int,
             eos: bool = False) -> tuple[list[list[int]], float]:
    """Greedy outputs and tokens/s over the whole run (`eos`: stop at EOS, else exactly `gen` tokens each)."""
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=not eos)
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        for i in range(first, min(first + batch, len(prompts))):
            engine.add_request(str(i), prompts[i], params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
    wall = time.perf_counter() - start
    outs = [outputs[str(i)] for i in range(len(prompts))]
    return outs, sum(map(len, outs)) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--exits", default="6,10,15,20", help="exit layers E, comma-separated")
    p.add_argument("--drafts", default="2,4", help="draft lengths K, comma-separated")
    p.add_argument("--adaptive", action="store_true", help="also run the adaptive policy at the largest K")
    p.add_argument("--draft-model", default=None, help="draft with this model instead of exit layers (--exits ignored)")
    p.add_argument("--ngram", type=int, default=0, metavar="N",
                   help="draft by prompt lookup of the text's last N..2 tokens instead of exit layers (--exits ignored); "
                        "with --draft-model, look up first and draft with the model where nothing matches")
    p.add_argument("--task", choices=["continue", "quote", "summarize"], default="continue",
                   help="continue held-out text (default), or chat prompts: repeat / summarize a held-out paragraph")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--draft-head", default="", help="self drafts through an RTN copy of the LM head: int8, int4 "
                   "or several (comma-separated, each a run of its own; 'none' the model's head)")
    p.add_argument("--exit-confidence", default="", help="lossy runs: draft-probability thresholds, comma-separated")
    p.add_argument("--reps", type=int, default=1,
                   help="plain and speculative runs alternated this many times; speedup = median ratio [min, max]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_model, tok = load(args.model, dtype=args.dtype)
    prompts = (bench_prompts(tok, args.prompts, args.prompt_len) if args.task == "continue"
               else task_prompts(tok, args.prompts, args.task))
    eos = args.task != "continue"
    plain = LLMEngine(hf_model, tok, EngineConfig(max_num_seqs=max(args.batch, 1)))
    generate(plain, prompts[:1], 8, 1)  # warm-up: kernels built and packed
    reference, plain_tps = generate(plain, prompts, args.gen, args.batch, eos)
    print(f"plain: {plain_tps:.1f} tok/s (batch {args.batch}, {args.dtype})")
    rows = []
    drafts = [int(k) for k in args.drafts.split(",")]
    draft = load(args.draft_model, dtype=args.dtype)[0] if args.draft_model else None
    exit_spec = read_exit_spec(args.model) if resolve(args.model).kind == "export" else None
    sources = ["draft"] if draft is not None else ["ngram"] if args.ngram else [int(e) for e in args.exits.split(",")]
    for exit_layer in sources:
        heads = [None if h in ("", "none") else h for h in (args.draft_head or "none").split(",")]
        runs = [(k, False, None, head) for head in heads for k in drafts]
        runs += [(max(drafts), True, None, head) for head in heads] if args.adaptive else []
        runs += [(max(drafts), False, float(c), None) for c in args.exit_confidence.split(",") if c.strip()]
        norm, proj = draft_weights(args.model, exit_spec, exit_layer) if isinstance(exit_layer, int) else (None, None)
        for k, adaptive, sure, head in runs:
            spec = (SpeculativeConfig(num_draft=k, adaptive=adaptive, draft_model=draft, exit_confidence=sure,
                                      prompt_lookup=args.ngram)
                    if draft is not None else
                    SpeculativeConfig(num_draft=k, adaptive=adaptive, prompt_lookup=args.ngram)
                    if args.ngram else
                    SpeculativeConfig(exit_layer=exit_layer, num_draft=k, adaptive=adaptive, exit_confidence=sure,
                                      draft_head=head, exit_norm=norm, exit_proj=proj))
            engine = LLMEngine(hf_model, tok, EngineConfig(max_num_seqs=max(args.batch, 1), speculative=spec))
            generate(engine, prompts[:1], 8, 1)
            engine.speculator.stats.__init__()
            ratios, tps_all, plain_all = [], [], []
            for _ in range(args.reps):  # side by side, alternated: each ratio at one moment's load
                plain_all.append(generate(plain, prompts, args.gen, args.batch, eos)[1])
                outs, tps = generate(engine, prompts, args.gen, args.batch, eos)
                tps_all.append(tps)
                ratios.append(tps / plain_all[-1])
            tps, plain_tps = statistics.median(tps_all), statistics.median(plain_all)
            st = engine.speculator.stats
            same = sum(o == r for o, r in zip(outs, reference))
            row = {"exit_layer": exit_layer, "exit": "shared" if norm is None else exit_spec.norm, "num_draft": k, "adaptive": adaptive, "draft_head": head or "model",
                   "acceptance": round(st.acceptance_rate, 3), "tokens_per_step": round(st.mean_accepted_length, 2),
                   "identical": f"{same}/{len(prompts)}", "lookup_steps": st.lookup_steps, "steps": st.steps, "tok_s": round(tps, 1), "plain_tok_s": round(plain_tps, 1),
                   "speedup": round(statistics.median(ratios), 2),
                   "speedup_range": [round(min(ratios), 2), round(max(ratios), 2)]}
            if sure is not None:
                match = sum(x == y for o, r in zip(outs, reference) for x, y in zip(o, r))
                row.update(exit_confidence=sure, matching_tokens=round(match / sum(map(len, reference)), 3))
            rows.append(row)
            print(json.dumps(row))
            del engine
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
