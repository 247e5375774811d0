"""The `slimlm` command: thin argument parsing over the recipes, `serve` and `toolkit`.

Each verb has its own `add_X(subparsers)` and `run_X(args)`. A verb exists only once it works.
User errors (SlimlmError, bad arguments) print one or two lines and exit with code 2; `--debug`
shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# Before torch loads: with this set, PyTorch's CPU allocator asks for transparent huge pages (madvise) for
# buffers of 2 MB and more, so a model's weights sit in 2 MB pages. Batch-1 decode reads every weight per
# token; with 4 KB pages its speed here swung between runs (bf16 SmolLM2: 104-158 tok/s) and with huge
# pages it held at 158-165 (docs/benchmarks.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from slimlm.recipes import compare, distill, early_exit, pipeline, prune, qat, quantize  # noqa: E402
from slimlm.recipes.compare_memory import trim_heap  # noqa: E402
from slimlm.recipes.training import quiet_libraries  # noqa: E402 - transformers' bars, Lightning's tips
from slimlm.toolkit.errors import SlimlmError  # noqa: E402


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out perplexity and multiple-choice accuracy of a model",
                       description="Perplexity over non-overlapping windows (plus bits per byte) on held-out "
                       "text, and log-likelihood accuracy on multiple-choice jsonl tasks.")
    p.add_argument("model", help="built-in alias (smollm2-135m), model folder, slimlm export, .gguf or hub id")
    p.add_argument("--data", action="append", metavar="SRC",
                   help="text source, repeatable: builtin:wiki|c4|tiny|code|multilingual|technical, "
                   "a .txt/.jsonl/.parquet file, or hf:<id>[:config][:split] (default builtin:wiki "
                   "when neither --data nor --tasks is given)")
    p.add_argument("--tasks", action="append", metavar="FILE.jsonl", default=[],
                   help='multiple-choice rows {"context", "choices", "label"}, repeatable')
    p.add_argument("--split", default="validation", choices=["validation", "train"],
                   help="split of built-in corpora (default validation: never seen in calibration or training)")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (0 or unset: all)")
    p.add_argument("--spread-windows", action="store_true",
                   help="with --max-windows: N windows spread evenly over each source, not its first N (a "
                   "source's start may not be like the rest: builtin:wiki's validation part ends in hundreds "
                   "of short stubs)")
    p.add_argument("--batch-size", "--eval-batch-size", dest="batch_size", type=int, default=4,
                   help="windows or choices per forward pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bf16 or fp16")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--exits", default=None, metavar="E,E",
                   help="also report, per exit after layer E (shared final norm), perplexity and how often its "
                   "greedy token equals the final layer's (default: the exits an early-exit export records)")
    p.add_argument("--json", metavar="OUT", help="write every figure, the settings and the command to OUT")


def check_outputs(args) -> None:
    """Refuse a --json path that cannot be written and a --threads below 1 before any work: a long run must not
    end in a crash that loses its results."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise SlimlmError(f"--threads must be at least 1, got {args.threads}.")
    path = getattr(args, "json", None)
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise SlimlmError(f"--json {path} is a folder.", "Pass a file path, e.g. results.json.")
    parent = next(p for p in [*path.parents] if p.exists())
    if not parent.is_dir():
        raise SlimlmError(f"--json {path}: {parent} is a file, so no folder can be made there.",
                          "Pass a path under a folder.")
    if not os.access(parent, os.W_OK):
        raise SlimlmError(f"--json {path}: {parent} is not writable.", "Pass a path you can write to.")


def exits_to_evaluate(args, model):
    """ExitHeads of an early-exit export, or the --exits layers with the shared norm; None for neither."""
    from slimlm.toolkit.early_exit import load_exits, read_exit_spec
    from slimlm.toolkit.models import resolve

    exported = resolve(args.model).kind == "export" and read_exit_spec(args.model, verify=False)
    if args.exits:
        try:
            layers = [int(e) for e in args.exits.split(",") if e.strip()]
        except ValueError:
            raise SlimlmError(f"--exits {args.exits!r} is not a comma-separated list of layer numbers.") from None
        n = model.config.num_hidden_layers
        if not layers or not all(1 <= e <= n for e in layers):
            raise SlimlmError(f"--exits {args.exits!r}: layers must be in 1..{n} (the model has {n} layers).")
        if exported and exported.norm != "shared":
            print(f"slimlm eval: --exits reads layers {args.exits} through the shared final norm, not this export's "
                  f"trained exits ({exported.norm} norm, layers {','.join(map(str, exported.layers))}); leave --exits "
                  "out to evaluate those.", file=sys.stderr)
        return layers
    if exported:
        return load_exits(args.model, model, verify=False)
    return None


def run_eval(args) -> int:
    from slimlm.toolkit.data import check_source
    from slimlm.toolkit.eval import evaluate, load_tasks, print_results, write_json
    from slimlm.toolkit.models import load, parse_dtype, resolve

    if args.window < 2 or args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 0):
        raise SlimlmError("--window must be >= 2, --batch-size >= 1 and --max-windows >= 0 (0: all).")
    args.max_windows = args.max_windows or None  # 0 means all, as in compare and the pipeline
    check_outputs(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = args.data or ([] if args.tasks else ["builtin:wiki"])
    if args.exits and not data:
        raise SlimlmError("--exits reports each exit's perplexity and agreement on held-out text, and no --data "
                          "was given (only --tasks).", "Pass --data SRC as well, e.g. --data builtin:wiki.")
    if args.spread_windows and args.max_windows is None:
        raise SlimlmError("--spread-windows spreads --max-windows windows over each source, and --max-windows "
                          "is not set (every window is evaluated).", "Pass --max-windows N, or leave "
                          "--spread-windows out.")
    # Refuse typos before the (slow) model load.
    resolve(args.model)
    parse_dtype(args.dtype)
    for spec in data:
        check_source(spec)
    for path in args.tasks:
        load_tasks(path)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    exits = exits_to_evaluate(args, model)  # a bad --exits is refused before the perplexity run
    results = evaluate(model, tokenizer, data=data, tasks=args.tasks, split=args.split, window=args.window,
                       max_windows=args.max_windows, batch_size=args.batch_size, spread_windows=args.spread_windows)
    results["model"] = args.model
    results["settings"] = {k: getattr(args, k) for k in ("split", "window", "max_windows", "spread_windows",
                                                         "batch_size", "dtype")}
    results["command"] = args.command_line
    print_results(results)
    if exits is not None and data:
        from slimlm.toolkit.early_exit import evaluate_exits, format_exit_table

        results["early_exit"] = evaluate_exits(model, tokenizer, exits, data=data[0], split=args.split,
                                               window=args.window, max_windows=args.max_windows,
                                               batch_size=args.batch_size, spread=args.spread_windows)
        print(f"early exits on {data[0]} ({args.split}): perplexity and agreement with the final layer's "
              f"greedy token\n{format_exit_table(results['early_exit'])}")
    if args.json:
        write_json(results, args.json)
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a verified, HF-loadable slimlm export folder",
                       description="Writes config.json, safetensors, tokenizer and slimlm.json (a manifest "
                       "with the sha256 of config.json and every tensor file). Loads unchanged with transformers.")
    p.add_argument("model", help="built-in alias, model folder, slimlm export, .gguf or hub id")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--dtype", default="float32", help="float32 (default), bf16 or fp16")


def run_export(args) -> int:
    from rich.console import Console

    from slimlm.toolkit.export import check_target, kept_transforms, read, write
    from slimlm.toolkit.models import load, resolve

    out = Path(args.out)
    check_target(out, args.overwrite)  # refuse before any work starts
    source = resolve(args.model)
    if source.kind == "export":
        done = read(source.location, verify=False)
        made = [what for what, key in (("quantized weights", "quant"), ("early exits", "exit_layers"))
                if done.transforms.get(key)]
        if made:
            raise SlimlmError(f"{args.model} is already a slimlm export with {' and '.join(made)}; exporting it again "
                              "would write plain dense weights and drop them.",
                              "Copy the folder instead (`cp -r`), or export the model it was made from.")
    model, tokenizer = load(args.model, dtype=args.dtype)
    write(model, tokenizer, out, meta={"base_model": args.model, "command": args.command_line,
                                       "transforms": kept_transforms(args.model)},  # a pruned export's shapes stay
          overwrite=args.overwrite)
    manifest = read(out)
    Console().print(f"exported [bold]{args.model}[/] to {out} ({len(manifest.tensor_files)} tensor file(s), verified)")
    return 0


def add_speculative_arguments(p) -> None:
    p.add_argument("--speculative", choices=["self", "draft", "ngram"], default=None,
                   help="self: draft with the first --exit-layer layers and verify with the rest; draft: draft "
                   "with --draft-model; ngram: draft what followed the text's last --prompt-lookup tokens where "
                   "they occurred before in the prompt or output (pays where outputs quote their input) "
                   "(lossless for greedy and sampled requests; the draft length adapts and switches off where "
                   "it does not pay)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="--speculative ngram: the longest suffix of the text looked up (default 3); with "
                        "--speculative draft: look up first and draft with the model where the text holds no match")
    p.add_argument("--prompt-lookup-min", type=int, default=2, metavar="N",
                   help="the shortest suffix looked up when no longer one matches (default 2)")
    p.add_argument("--exit-layer", type=int, default=None, help="layers the draft runs (default: a quarter)")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="--speculative draft: a smaller model with the same tokenizer (e.g. a pruned, distilled export), "
                   "or a quantized copy of the target (an int4 export of it), which drafts in the target's KV cache")
    p.add_argument("--num-draft", type=int, default=4, help="most tokens drafted per step (default 4)")
    p.add_argument("--exit-confidence", type=float, default=None, metavar="P",
                   help="LOSSY (CALM-style): keep a greedy draft token whose draft probability is >= P even where "
                        "the full model disagrees; off by default (docs/benchmarks.md has its accuracy cost)")
    p.add_argument("--draft-head", choices=["int8", "int4"], default=None,
                   help="--speculative self: draft through an RTN copy of the LM head (lossless: the verify pass "
                        "keeps the model's head; cheaper drafts where the head is large)")


def speculative_config(args, num_layers: int, tokenizer=None):
    """The engine's SpeculativeConfig for --speculative (None without it); SlimlmError for a bad layer or draft.

    From an early-exit export, the exit layer defaults to its shallowest trained exit, and an exit with a
    norm (and lens) of its own drafts through them."""
    from slimlm.serve.engine.speculative import SpeculativeConfig, expected_speedup
    from slimlm.toolkit.early_exit import draft_weights, read_exit_spec
    from slimlm.toolkit.models import resolve

    if args.speculative != "self" and args.exit_layer is not None:
        raise SlimlmError("--exit-layer needs --speculative self.")
    if args.speculative and getattr(args, "kv_cache_dtype", "auto") == "int8":
        print("note: with --kv-cache-dtype int8, speculative decoding is not lossless: the keys and values of drafts "
              "that are then rejected can grow their int8 block's scale and re-round the entries before them, so "
              "greedy output can differ from plain int8 decoding's. A float KV cache keeps it exact.", file=sys.stderr)
    if (args.speculative == "draft") != (args.draft_model is not None):
        raise SlimlmError("--speculative draft and --draft-model go together.",
                          "Pass --speculative draft --draft-model MODEL (a smaller model with the same tokenizer).")
    sure = args.exit_confidence
    if sure is not None and (args.speculative is None or not 0 <= sure <= 1):
        raise SlimlmError(f"--exit-confidence needs --speculative and a probability in [0, 1], got {sure}.")
    if args.draft_head is not None and args.speculative != "self":
        raise SlimlmError("--draft-head needs --speculative self (a draft model has its own head).")
    if args.speculative is None:
        return None
    if args.num_draft < 1:
        raise SlimlmError(f"--num-draft must be at least 1, got {args.num_draft}.")
    lookup = args.prompt_lookup if args.prompt_lookup is not None else 3 if args.speculative == "ngram" else 0
    if lookup and args.speculative not in ("ngram", "draft"):
        raise SlimlmError("--prompt-lookup needs --speculative ngram (lookup alone) or draft (lookup, then the model).")
    if lookup and sure is not None:
        raise SlimlmError("--exit-confidence needs drafts with probabilities; prompt-lookup drafts have none.")
    if lookup and not 1 <= args.prompt_lookup_min <= lookup:
        raise SlimlmError(f"--prompt-lookup must be at least --prompt-lookup-min (>= 1); got "
                          f"{lookup} and {args.prompt_lookup_min}.")
    if args.speculative == "draft":
        return SpeculativeConfig(num_draft=args.num_draft, draft_model=draft_model(args, tokenizer),
                                 exit_confidence=sure, prompt_lookup=lookup, prompt_lookup_min=args.prompt_lookup_min)
    if args.speculative == "ngram":
        return SpeculativeConfig(num_draft=args.num_draft, prompt_lookup=lookup, prompt_lookup_min=args.prompt_lookup_min)
    spec = read_exit_spec(args.model, verify=False) if resolve(args.model).kind == "export" else None
    default = spec.layers[0] if spec else max(1, num_layers // 4)
    exit_layer = args.exit_layer if args.exit_layer is not None else default
    if not 1 <= exit_layer < num_layers or args.num_draft < 1:
        raise SlimlmError(f"--exit-layer must be in 1..{num_layers - 1} (the model has {num_layers} layers) "
                          f"and --num-draft at least 1; got {exit_layer} and {args.num_draft}.")
    norm, proj = draft_weights(args.model, spec, exit_layer)
    config = SpeculativeConfig(exit_layer=exit_layer, num_draft=args.num_draft, exit_norm=norm, exit_proj=proj,
                               exit_confidence=sure, draft_head=args.draft_head)
    best = max(expected_speedup(1.0, k, exit_layer / num_layers, config.verify_cost) for k in range(1, args.num_draft + 1))
    if best <= 1.05:  # the adaptive policy never drafts there: say so rather than serve plainly without a word
        print(f"note: --exit-layer {exit_layer} of {num_layers} layers: even drafts that are always right would "
              f"give at most {best:.2f}x by the engine's cost model, so it decodes plainly; a shallower exit "
              f"(e.g. {max(1, num_layers // 4)}) can pay.", file=sys.stderr)
    return config


def draft_model(args, tokenizer):
    """The --draft-model, loaded like the target (dtype, device); SlimlmError unless its tokenizer is `tokenizer`."""
    from slimlm.toolkit.models import load, resolve

    resolve(args.draft_model)
    draft, draft_tok = load(args.draft_model, dtype=args.dtype, device=args.device)
    if draft_tok.get_vocab() != tokenizer.get_vocab():
        raise SlimlmError(f"--draft-model {args.draft_model} has another tokenizer than {args.model}.",
                          "A draft must share the target's tokenizer (e.g. a pruned or distilled variant of it).")
    return draft


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency of the serving engine, against a baseline in the same run",
                       description="Offline throughput at each batch size and online load (fixed concurrency or "
                       "Poisson arrivals): tokens/s, requests/s, TTFT, TPOT, inter-token latency p50/p99; "
                       "warm-up, then --reps repetitions, median [min, max].")
    p.add_argument("model", help="built-in alias, model folder, slimlm export, .gguf or hub id")
    p.add_argument("--baseline", choices=["hf", "none"], default="none",
                   help="hf: transformers.generate on the same prompts and lengths, in the same run")
    p.add_argument("--batch-sizes", default="1,16", help="offline batch sizes, comma-separated (default 1,16)")
    p.add_argument("--concurrency", type=int, default=32, help="online: requests in flight (0: skip; default 32)")
    p.add_argument("--rate", type=float, default=None, help="online: Poisson arrivals per second instead of --concurrency")
    p.add_argument("--num-requests", type=int, default=None, help="online: requests per repetition (default 2x concurrency)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (held-out text; default 128)")
    p.add_argument("--task", choices=["quote", "summarize"], default=None,
                   help="chat prompts asking to repeat / summarize a held-out paragraph instead of --prompt-len "
                        "tokens of text to continue (outputs that reuse their input: where --speculative ngram pays)")
    p.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                   help="your own prompts, one JSON object a line: {\"prompt\": text}, {\"messages\": [chat]} or "
                        "{\"prompt_token_ids\": [ids]} (at least as many as the run needs; replaces --prompt-len)")
    p.add_argument("--gen-len", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--reps", type=int, default=3, help="repetitions after the warm-up (default 3)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), float32 or fp16")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="auto: the model's dtype (default); int8: per-block, per-head scales, half the memory")
    add_speculative_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", metavar="OUT", help="write every figure, the settings and the command to OUT")


def add_engine_arguments(p) -> None:
    """Where and how the engine runs: the same flags on `serve` and `bench`."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (Triton attention and int4/int8 kernels)")
    p.add_argument("--quantize-lm-head", choices=["int4", "int8"], default=None,
                   help="RTN-quantize the LM head at load (g64, asymmetric): faster decode for small models "
                        "with big vocabularies, at a perplexity cost (docs/benchmarks.md); default: dense")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run every decode step eagerly (default: replay a CUDA graph per batch-size bucket)")


def run_bench(args) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from slimlm.serve.bench import benchmark
    from slimlm.serve.engine.engine import EngineConfig, LLMEngine
    from slimlm.toolkit.eval import write_json
    from slimlm.toolkit.models import load, resolve

    try:
        batch_sizes = list(dict.fromkeys(int(b) for b in args.batch_sizes.split(",") if b.strip()))
    except ValueError:
        raise SlimlmError(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers.") from None
    if any(b < 1 for b in batch_sizes) or args.reps < 1 or args.prompt_len < 1 or args.gen_len < 1:
        raise SlimlmError("--batch-sizes, --reps, --prompt-len and --gen-len must be positive.")
    if not batch_sizes and not (args.concurrency or args.rate):
        raise SlimlmError(f"nothing to measure: --batch-sizes {args.batch_sizes!r} names no batch size and "
                          "--concurrency 0 skips the online run.", "Give a batch size, or --concurrency N or --rate R.")
    if args.concurrency < 0 or (args.num_requests is not None and args.num_requests < 1) or \
            (args.rate is not None and not args.rate > 0):
        raise SlimlmError("--concurrency must be >= 0 (0 skips the online run), --num-requests >= 1 and --rate > 0; got "
                          f"{args.concurrency}, {args.num_requests} and {args.rate}.")
    check_outputs(args)
    resolve(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    if args.prompts_file is not None:
        if args.task is not None:
            raise SlimlmError("--prompts-file and --task both name the prompts; pass one of them.")
        if not Path(args.prompts_file).is_file():
            raise SlimlmError(f"--prompts-file {args.prompts_file}: no such file.")
    hf_model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    spec = speculative_config(args, hf_model.config.num_hidden_layers, tokenizer)
    given, where = None, []  # the file's or the task's prompts as token ids, and where each is (for messages)
    if args.prompts_file is not None or args.task is not None:
        from slimlm.serve.bench import file_prompts, prompt_rows, prompts_needed, task_prompts

        n = prompts_needed(batch_sizes, args.concurrency or None, args.num_requests, args.rate)
        if args.prompts_file is not None:
            try:  # checked before any timing: a bad line is reported at once
                given = file_prompts(tokenizer, args.prompts_file, n)
            except ValueError as e:
                raise SlimlmError(str(e), "Fix the file or ask for fewer prompts (--batch-sizes, --concurrency, "
                                          "--num-requests).") from None
            where = [f"line {row['line']} of {args.prompts_file}" for row in prompt_rows(args.prompts_file, n)]
        else:
            given = task_prompts(tokenizer, n, args.task)
            where = [f"{args.task} prompt {i + 1}" for i in range(len(given))]

    # online with --rate and no --concurrency: every request may be in flight at once, so the engine holds them all
    # (sized by the batch sizes alone, Poisson arrivals queued behind a batch-1 engine), up to one token each a step
    online_cap = args.concurrency or (min(args.num_requests or 32, EngineConfig.max_num_batched_tokens) if args.rate
                                      else 1)

    def engine_with(speculative):
        try:
            return LLMEngine(hf_model, tokenizer, EngineConfig(max_num_seqs=max([*batch_sizes, online_cap]),
                                                               kv_cache_dtype=args.kv_cache_dtype, speculative=speculative,
                                                               quantize_lm_head=args.quantize_lm_head,
                                                               cuda_graphs=False if args.enforce_eager else None),
                             model_name=args.model)
        except ValueError as err:  # e.g. a model type slimlm's engine does not serve
            raise SlimlmError(f"cannot benchmark {args.model}: {err}") from err

    engine = engine_with(None)
    if args.task is None and args.prompts_file is None and args.prompt_len + args.gen_len > engine.max_model_len:
        raise SlimlmError(f"--prompt-len {args.prompt_len} plus --gen-len {args.gen_len} is more than this model's "
                          f"context of {engine.max_model_len} tokens.", "Lower --prompt-len or --gen-len.")
    if given:  # their lengths are known only once tokenized
        longest = max(range(len(given)), key=lambda i: len(given[i]))
        if len(given[longest]) + args.gen_len > engine.max_model_len:
            raise SlimlmError(f"the prompt at {where[longest]} has {len(given[longest])} tokens; with --gen-len "
                              f"{args.gen_len} that is more than this model's context of {engine.max_model_len} "
                              "tokens (it would stop short of --gen-len).", "Lower --gen-len or shorten the prompts.")
    with console.status("benchmarking") as status:
        result = benchmark(engine, hf_model if args.baseline == "hf" else None, batch_sizes,
                           args.concurrency or None, args.rate, args.num_requests, args.prompt_len,
                           args.gen_len, args.reps, progress=status.update, task=args.task,
                           prompts_file=args.prompts_file)
        if spec is not None:  # the same engine with speculation, same prompts, same run; plain is 1.0x
            del engine
            engine = engine_with(spec)
            fast = benchmark(engine, None, batch_sizes, args.concurrency or None, args.rate, args.num_requests,
                             args.prompt_len, args.gen_len, args.reps,
                             progress=lambda msg: status.update(f"speculative {msg}"), task=args.task,
                             prompts_file=args.prompts_file)
            merge_speculative(result, fast, engine.stats())
    prompts = (f"prompts of {args.prompts_file}" if args.prompts_file else f"{args.task} prompts" if args.task
               else f"{args.prompt_len}-token prompts")
    table = Table(title=escape(f"bench: {args.model} ({args.dtype}, {prompts}, "
                               f"{args.gen_len} new tokens, KV cache {args.kv_cache_dtype}; median [min, max] of {args.reps})"))
    table.add_column("run")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, row in result["rows"].items():
        for metric, spread in row.items():
            table.add_row(name, metric, escape(f"{spread['median']:.1f} [{spread['min']:.1f}, {spread['max']:.1f}]"))
    for name, ratio in result["ratios"].items():
        table.add_row(name, "ratio (tokens/s)", f"{ratio:.2f}x")
    if "speculative" in result:
        st = result["speculative"]
        table.add_row("spec", "draft tokens accepted", f"{st['spec_acceptance_rate']:.1%}")
        table.add_row("spec", "tokens per spec. step", f"{st['spec_mean_accepted_length']:.2f}")
        if st.get("spec_lookup_steps_total") and st["spec_lookup_steps_total"] < st["spec_steps_total"]:
            table.add_row("spec", "steps drafted by lookup", f"{st['spec_lookup_steps_total'] / st['spec_steps_total']:.1%}")
    Console().print(table)
    if args.json:
        write_json({**result, "model": args.model, "kv_cache_dtype": str(engine.kv_dtype).removeprefix("torch."),
                    "quantize_lm_head": args.quantize_lm_head, "device": args.device,
                    "cuda_graphs": engine.runner.graphs is not None,
                    "command": args.command_line}, args.json)
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
                       "/metrics. Binds 127.0.0.1 unless told otherwise.")
    p.add_argument("model", help="built-in alias, model folder, slimlm export, .gguf or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $SLIMLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: MODEL)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), float32 or fp16")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch (default 64)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache (default 1.0)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="auto: the model's dtype (default); int8: per-block, per-head scales, twice the sequences "
                        "(a block's scale spans the tokens a step writes into it, so a prompt token's echoed logprob "
                        "can move slightly with the tokens after it; use auto for log-likelihood scoring)")
    add_speculative_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    p.add_argument("--max-queue", type=int, default=256, help="requests held at once; past it, 429 (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def merge_speculative(result: dict, fast: dict, stats: dict) -> None:
    """Add the speculative engine's rows as "spec ..." beside the plain ones, with their ratios and acceptance."""
    for name, row in fast["rows"].items():
        spec_name = name.replace("engine", "spec", 1)
        result["rows"][spec_name] = row
        result["ratios"][f"{spec_name} / {name}"] = (row["tokens_per_s"]["median"]
                                                     / result["rows"][name]["tokens_per_s"]["median"])
        if "decode_tokens_per_s" in row:  # batch rows: decoding alone, where speculation acts
            result["ratios"][f"{spec_name} / {name}, decode"] = (
                row["decode_tokens_per_s"]["median"] / result["rows"][name]["decode_tokens_per_s"]["median"])
    result["speculative"] = {k: v for k, v in stats.items() if k.startswith("spec_")}


def run_serve(args) -> int:
    import torch
    from rich.console import Console

    from slimlm.serve.api import serve
    from slimlm.serve.engine.engine import ContextTooLong, EngineConfig, LLMEngine
    from slimlm.toolkit.models import load, resolve

    if not 0 < args.port < 65536 or args.max_num_seqs < 1 or args.kv_cache_gb <= 0 or args.max_queue < 1:
        raise SlimlmError("--port must be 1-65535; --max-num-seqs, --kv-cache-gb and --max-queue positive.")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise SlimlmError(f"--max-model-len must be at least 2, got {args.max_model_len}.")
    check_outputs(args)
    resolve(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          kv_cache_gb=args.kv_cache_gb, enable_prefix_caching=not args.no_prefix_caching,
                          kv_cache_dtype=args.kv_cache_dtype, quantize_lm_head=args.quantize_lm_head,
                          cuda_graphs=False if args.enforce_eager else None,
                          speculative=speculative_config(args, hf_model.config.num_hidden_layers, tokenizer))
    try:
        engine = LLMEngine(hf_model, tokenizer, config, model_name=args.served_model_name or args.model)
    except ValueError as err:  # e.g. --max-model-len past the model's context or sliding window
        raise SlimlmError(f"cannot serve {args.model}: {err}", "Pass a smaller --max-model-len (default: the model's "
                          "context, at most 4096)." if isinstance(err, ContextTooLong) else None) from err
    del hf_model  # the engine holds its own form of the weights: the loaded model would double the memory served
    trim_heap()  # and its pages go back to the system
    asked = engine._blocks_for(args.kv_cache_gb)
    if engine.block_manager.num_blocks > asked:
        Console(stderr=True).print(
            f"note: --kv-cache-gb {args.kv_cache_gb} holds {asked} blocks of {config.block_size} tokens; the cache has "
            f"{engine.block_manager.num_blocks}, so that one request of --max-model-len {engine.max_model_len} fits")
    serve(engine, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue)
    return 0


VERBS = {"eval": (add_eval, run_eval), "export": (add_export, run_export), "bench": (add_bench, run_bench),
         "serve": (add_serve, run_serve), "compare": (compare.add_compare, compare.run_compare),
         "distill": (distill.add_distill, distill.run_distill), "prune": (prune.add_prune, prune.run_prune),
         "quantize": (quantize.add_quantize, quantize.run_quantize),
         "pipeline": (pipeline.add_pipeline, pipeline.run_pipeline),
         "early-exit": (early_exit.add_early_exit, early_exit.run_early_exit),
         "qat": (qat.add_qat, qat.run_qat)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description="Make LLMs smaller and faster, and prove it.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add, _ in VERBS.values():
        add(sub)
    parser.set_defaults(verb_parsers=sub.choices)  # each verb's parser, for its own usage line in errors
    return parser


def parse_arguments(argv: list[str]):
    """The verb's arguments. key=value overrides of the training recipes may also follow a flag
    (`--config C a=1 --resume b=2`), as `python recipes/X.py` takes them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:  # the verb's usage and name, not the top-level one's; exit 2
        args.verb_parsers[args.verb].error(f"unrecognized arguments: {' '.join(extra)}")
    del args.verb_parsers
    return args


def main(argv: list[str] | None = None, command_line: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--debug" in argv[1:]:  # after the verb too (`slimlm eval X --debug`), as the recipe scripts take it
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    args = parse_arguments(argv)
    args.command_line = command_line or "slimlm " + shlex.join(argv)
    quiet_libraries()
    try:
        return VERBS[args.verb][1](args)
    except SlimlmError as err:
        print(f"slimlm {args.verb}: error: {err.what}", file=sys.stderr)
        if err.hint:
            print(err.hint, file=sys.stderr)
        if args.debug:
            raise
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a user error: say so briefly
        if args.debug:
            raise
        print(f"slimlm {args.verb}: internal error: {type(err).__name__}: {err}\n"
              "Rerun with --debug for the traceback, and please report it.", file=sys.stderr)
        return 1


def run_script(verb: str, argv: list[str] | None = None) -> int:
    """`python recipes/VERB.py ARGS` runs exactly as `slimlm VERB ARGS` (a --debug may come anywhere)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = [a for a in argv if a != "--debug"]
    return main(["--debug"] * (len(rest) < len(argv)) + [verb, *rest],
                command_line=f"python recipes/{verb.replace('-', '_')}.py " + shlex.join(rest))


if __name__ == "__main__":
    sys.exit(main())
