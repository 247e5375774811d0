"""Greedy output of slimlm's engine against transformers.generate on a fixed prompt set.

    .venv/bin/python scripts/greedy_identity.py [--model smollm2-135m] [--prompts 32] [--new 32]

Prompts: the first `--prompts` 64-token windows of the held-out part of builtin:wiki (fixed).
fp32: the engine must be token-identical to HF on every prompt at batch 1, at batch 16 and with
prefix caching off. bf16: the share of prompts whose first `--new` tokens equal HF's bf16 output
(bf16 rounding differs between any two implementations, so a few prompts may diverge late).
Prints one JSON object; exits non-zero if an fp32 check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.data import load_texts, token_stream
from slimlm.toolkit.models import load


def hf_greedy(model, prompts, new):
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            # eos_token_id=None: generate past EOS like the engine's ignore_eos (min_new_tokens would
            # instead forbid EOS, a different greedy choice whenever EOS is the argmax).
            out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
    return out


def engine_greedy(llm, prompts, new, batch):
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = []
    for i in range(0, len(prompts), batch):
        outs += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + batch], params)]
    return outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    args = p.parse_args()
    start = time.perf_counter()
    model, tok = load(args.model, dtype="float32")
    stream = token_stream(load_texts("builtin:wiki", split="validation"), tok)
    prompts = [stream[i * 64:(i + 1) * 64].tolist() for i in range(args.prompts)]
    report = {"model": args.model, "prompts": len(prompts), "new_tokens": args.new}
    ref = hf_greedy(model, prompts, args.new)
    for name, batch, prefix in [("fp32 batch 1", 1, True), ("fp32 batch 16", 16, True),
                                ("fp32 batch 16, no prefix caching", 16, False)]:
        got = engine_greedy(LLM(model, tok, enable_prefix_caching=prefix), prompts, args.new, batch)
        report[name] = sum(a == b for a, b in zip(got, ref)) / len(prompts)
    bf = model.to(torch.bfloat16)
    ref_bf = hf_greedy(bf, prompts, args.new)
    for batch in (1, 16):
        got_bf = engine_greedy(LLM(bf, tok), prompts, args.new, batch)
        report[f"bf16 batch {batch} identical to HF bf16"] = sum(a == b for a, b in zip(got_bf, ref_bf)) / len(prompts)
        report[f"bf16 batch {batch} mean identical prefix (tokens)"] = sum(
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(got_bf, ref_bf)) / len(prompts)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0 if all(report[k] == 1.0 for k in report if k.startswith("fp32")) else 1


if __name__ == "__main__":
    sys.exit(main())
