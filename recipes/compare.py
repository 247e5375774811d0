"""`slimlm compare BASE VARIANT...`: accuracy beside speed for several models, with the base as 1.0x.

    slimlm compare smollm2-135m out/smollm2-int4 out/smollm2-70m --out out/compare

Per model: held-out perplexity (32 windows by default, so a comparison takes minutes on a CPU) and
multiple-choice accuracy, measured in a fresh process; then, here, speed in slimlm's serving engine
on the same prompts (`serve.bench.benchmark`: batch-1 decode tokens/s, i.e. 1 / TPOT, and batch-1
tokens/s with the prefill; tokens/s and TTFT p50 at fixed concurrency; median [min, max] of --reps);
parameters; size on disk. Writes report.md, report.json and pareto.png to --out (compare_report.py)
and prints the table.

Memory, two figures, each from a fresh process (`compare_memory.py`): the evaluation's peak (RSS past the RSS
before the load, while loading and evaluating), and serving memory: what the model holds in slimlm's engine
(weights as served, KV cache for the benchmark, a draft model where one drafts) after serving one full batch.

Cache and resume rule: --out/cache/ holds a JSON per model named by a hash of the model's identity
(kind, location, every file's size and mtime, an export's manifest hash) and the settings.
- Accuracy, both memory figures and parameters are measured once per model and settings, then reused.
- The base's speed is measured in every run that times a model: a speed ratio divides two figures of the
  same run only. A re-run that adds nothing (every speed cached) times nothing again.
- The models measured in a run are loaded together and their repetitions alternate (--speed-order
  alternate; `auto` does so where they fit in half the free memory): each repetition runs every model
  once, so each has one ratio to the base per repetition, and a change of load on a shared machine
  moves both sides of it. Their speed is cached when all are done. --speed-order sequential measures
  (and caches) one model after the other, and its ratios divide medians.
- --speed-rounds N loads the models N times (--reps repetitions each) and spans every round: a second
  run's ratios move with where the weights land in memory, which repetitions of one load do not see.
- A variant's cached speed is reused with the base figures of the run that measured it (stored with
  it), so its ratio is that run's; the report marks it †.
So a re-run with one more model measures that model and the base's speed; an interrupted run resumes.
A variant that cannot be measured (its folder does not load, its evaluation runs out of memory: any error
slimlm names) is listed in the report as failed with its error and hint, and the others go on; what of it was measured
before is cached, and the next run measures the rest. The base failing stops the run: every ratio divides by it.
--out/settings.json pins the folder's settings: others are refused unless --overwrite (discards all).

Early-exit exports: drafting from their exits is what they are for, so under --speculative auto (the
default) one is benchmarked as `slimlm serve DIR --speculative self` serves it: self-speculative decoding
from its shallowest exit (through the exit's own norm and lens where it has them), adaptive draft length, at
most 4 drafts (`speculation_plan`); its speed result records the exit and the acceptance reached (over the
warm-ups and all repetitions). Greedy decoding stays the full model's (it verifies every draft), so its
accuracy is the model's own. --speculative off: every model decodes plainly. The plan is part of the
model's cache key.

A variant `MODEL+draft:DRAFT` is MODEL (its accuracy, evaluated as MODEL's) timed with draft-model
speculative decoding from DRAFT, adaptive, at most 4 drafts, as `slimlm serve MODEL --speculative draft
--draft-model DRAFT` runs it (asked for by name, so --speculative off does not apply); the draft's files join
its cache key, and its size on disk and serving memory count both. Its accuracy, parameters and evaluation memory are MODEL's
(copied from MODEL where it is listed before it, else evaluated). An int4 copy of the base as the draft
gives the base's perplexity at the speed its drafts buy (docs/benchmarks.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from slimlm.recipes.compare_memory import in_fresh_process, measure_serving_memory, peak_rss_bytes, reset_peak_rss
from slimlm.toolkit.errors import SlimlmError

OUR_FILES = ("report.md", "report.json", "pareto.png", "settings.json", "cache")


def _add_arguments(p) -> None:
    p.add_argument("base", metavar="BASE", help="the reference (1.0x): alias, model folder, export, .gguf or hub id")
    p.add_argument("variants", nargs="+", metavar="VARIANT", help="models to compare against the base; MODEL+draft:DRAFT "
                   "is MODEL timed with draft-model speculative decoding from DRAFT (e.g. an int4 copy of it), "
                   "MODEL+ngram with prompt-lookup drafts (copied from the text)")
    p.add_argument("--out", default="compare", help="report folder; also caches results (default ./compare)")
    p.add_argument("--overwrite", action="store_true", help="discard results in --out from earlier runs")
    p.add_argument("--data", action="append", metavar="SRC", help="held-out text for perplexity, repeatable (default "
                   "builtin:wiki): builtin:NAME, a .txt/.jsonl/.parquet file, or hf:<id>[:config][:split]")
    p.add_argument("--tasks", action="append", metavar="FILE.jsonl", default=[],
                   help='multiple-choice rows {"context", "choices", "label"}, repeatable')
    p.add_argument("--split", default="validation", choices=["validation", "train"], help="split of built-in corpora")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--max-windows", type=int, default=32, help="perplexity windows per source; 0: all (default 32)")
    p.add_argument("--spread-windows", action="store_true",
                   help="take the --max-windows windows evenly spread over each source instead of its first ones")
    p.add_argument("--eval-batch-size", type=int, default=4, help="windows or choices per forward pass (default 4)")
    p.add_argument("--eval-dtype", default="float32", help="dtype of the accuracy evaluation (default float32)")
    p.add_argument("--dtype", default="bf16", help="dtype of the serving engine for speed (default bf16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for speed (held-out text; default 128)")
    p.add_argument("--task", choices=["quote", "summarize"], default=None,
                   help="speed on chat prompts asking to repeat / summarize a held-out paragraph instead of "
                        "--prompt-len tokens of text to continue")
    p.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                   help="speed on your own prompts: {\"prompt\": text}, {\"messages\": [chat]} or "
                        "{\"prompt_token_ids\": [ids]} a line, at least --num-requests of them")
    p.add_argument("--gen-len", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight for the online figures (default 32)")
    p.add_argument("--num-requests", type=int, default=None, help="online requests per repetition (default 2x concurrency)")
    p.add_argument("--reps", type=int, default=3, help="speed repetitions after a warm-up (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--speed-rounds", type=int, default=1,
                   help="alternated speed: load the models this many times, --reps alternated repetitions each "
                   "time; figures and ranges span every round (default 1)")
    p.add_argument("--speed-order", choices=["auto", "alternate", "sequential"], default="auto",
                   help="alternate: all models loaded at once, their speed repetitions alternated (ratios per "
                   "repetition); sequential: one model after the other (one model in memory); auto (default): "
                   "alternate where the models fit in half the free memory")
    p.add_argument("--speculative", choices=["auto", "off"], default="auto",
                   help="auto (default): an early-exit export's speed is measured with self-speculative decoding "
                   "from its shallowest exit, as `slimlm serve DIR --speculative self` serves it; off: all plainly")


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="accuracy, speed, memory and size of models side by side, base = 1.0x",
                       description="Evaluates every model on the same held-out text and tasks, benchmarks each in "
                       "the same serving engine on the same prompts in one run; writes report.md, report.json, pareto.png.")
    _add_arguments(p)


# -- inputs, checked before any work starts -------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def settings_from_args(args) -> dict:
    """Every setting that changes a figure, checked; local data and task files by their content hash."""
    from slimlm.toolkit.data import check_source
    from slimlm.toolkit.eval import load_tasks
    from slimlm.toolkit.models import parse_dtype

    positive = {"--window": args.window - 1, "--eval-batch-size": args.eval_batch_size, "--prompt-len": args.prompt_len,
                "--gen-len": args.gen_len - 1, "--concurrency": args.concurrency, "--reps": args.reps,
                "--num-requests": args.num_requests or 1, "--threads": args.threads or 1,
                "--speed-rounds": args.speed_rounds}
    bad = [name for name, v in positive.items() if v < 1]
    if bad or args.max_windows < 0:
        raise SlimlmError(f"{', '.join(bad) or '--max-windows'} out of range.", "--window must be >= 2, "
                          "--gen-len >= 2 (batch-1 decode speed is timed from the second new token on), "
                          "--max-windows >= 0 (0: all), the other counts >= 1.")
    parse_dtype(args.eval_dtype)
    parse_dtype(args.dtype)
    data = args.data or ["builtin:wiki"]
    for spec in data:
        check_source(spec)
    for path in args.tasks:
        load_tasks(path)
    num_requests = args.num_requests or 2 * args.concurrency
    if args.prompts_file is not None:
        from slimlm.serve.bench import prompt_rows

        if args.task is not None:
            raise SlimlmError("--prompts-file and --task both name the speed prompts.", "Pass one of them.")
        if not Path(args.prompts_file).is_file():
            raise SlimlmError(f"--prompts-file {args.prompts_file}: no such file.")
        try:
            prompt_rows(args.prompts_file, num_requests)
        except ValueError as e:
            raise SlimlmError(str(e), "Fix the file, or pass fewer --num-requests.") from None
    files = [s for s in [*data, *args.tasks, *([args.prompts_file] if args.prompts_file else [])]
             if Path(s).expanduser().is_file()]  # ~ as the loaders read it
    return {"data": data, "tasks": list(args.tasks), "files_sha256": {s: file_sha256(Path(s).expanduser()) for s in files},
            "split": args.split, "window": args.window, "max_windows": args.max_windows or None,
            "eval_batch_size": args.eval_batch_size, "eval_dtype": args.eval_dtype, "device": args.device,
            "dtype": args.dtype, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "concurrency": args.concurrency, "num_requests": num_requests,
            "reps": args.reps, "threads": args.threads,
            # only where it is not 1: the settings of folders made before the option stay the same
            **({"speed_rounds": args.speed_rounds} if args.speed_rounds != 1 else {}),
            **({"speculative": "off"} if args.speculative == "off" else {}),
            **({"speed_task": args.task} if args.task else {}),
            **({"speed_prompts_file": args.prompts_file} if args.prompts_file else {}),
            **({"spread_windows": True} if args.spread_windows and args.max_windows else {})}


DRAFT_SEP = "+draft:"  # MODEL+draft:DRAFT: MODEL served with draft-model speculative decoding from DRAFT
NGRAM_SUFFIX = "+ngram"  # MODEL+ngram: MODEL served with prompt-lookup speculative decoding


def check_models(specs: list[str]) -> list[dict]:
    """Resolve every spec (unknown ones are refused here) and give each a unique short label. A variant
    `MODEL+draft:DRAFT` is MODEL timed with DRAFT as its draft model, `MODEL+ngram` with prompt-lookup
    drafts (`speculation_plan`)."""
    from slimlm.toolkit.models import resolve

    def place(spec: str) -> tuple[str, str, str]:  # kind, where its files are, a short name
        source = resolve(spec)
        local = source.kind in ("export", "hf_dir", "gguf")
        return source.kind, str(Path(source.location).resolve()) if local else spec, Path(source.location).name if local else spec

    models, seen = [], {}
    for i, given in enumerate(specs):
        ngram = given.endswith(NGRAM_SUFFIX)
        spec, sep, draft = given[:-len(NGRAM_SUFFIX)].partition(DRAFT_SEP) if ngram else given.partition(DRAFT_SEP)
        if sep and (i == 0 or not spec or not draft):
            raise SlimlmError(f"{given}: a draft model goes with a variant, as MODEL{DRAFT_SEP}DRAFT.",
                              "The base is timed plainly; list e.g. BASE, then BASE+draft:INT4_COPY as a variant.")
        if ngram and (i == 0 or not spec):
            raise SlimlmError(f"{given}: prompt lookup goes with a variant, as MODEL{NGRAM_SUFFIX} or "
                              f"MODEL{DRAFT_SEP}DRAFT{NGRAM_SUFFIX}.",
                              f"The base is timed plainly; list e.g. BASE, then BASE{NGRAM_SUFFIX} as a variant.")
        kind, where, name = place(spec)
        model = {"spec": spec, "kind": kind, "label": name, "role": "base" if i == 0 else "variant"}
        if sep:
            draft_kind, draft_where, draft_name = place(draft)
            where, model["label"] = f"{where}{DRAFT_SEP}{draft_where}", f"{name} + draft {draft_name}"
            model.update(draft=draft, draft_kind=draft_kind)
        if ngram:
            where, model["label"], model["ngram"] = f"{where}{NGRAM_SUFFIX}", f"{model['label']} + ngram", True
        if where in seen:
            raise SlimlmError(f"{given} is listed twice (as {seen[where]!r} and {given!r}).",
                              "Name each model once; the first one is the base.")
        seen[where] = given
        models.append(model)
    labels = [m["label"] for m in models]
    for m in models:
        if labels.count(m["label"]) > 1:
            m["label"] = (m["spec"] + (f" + draft {m['draft']}" if m.get("draft") else "")
                          + (" + ngram" if m.get("ngram") else ""))  # the full paths tell them apart
    return models


def check_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse an --out that holds other settings' results (or unrelated files) unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"--out {out} is a file.", "Pass a folder for the report.")
    saved = out / "settings.json"
    if saved.is_file() and not overwrite:
        old, new = json.loads(saved.read_text()), json.loads(json.dumps(settings))  # as JSON: tuples are lists
        diff = [f"{k}: {old.get(k)!r:.40} -> {new.get(k)!r:.40}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        if diff:
            raise SlimlmError(f"--out {out} holds a comparison made with other settings ({'; '.join(diff[:4])}).",
                              "Pass --overwrite to discard it, or choose another --out.")
    elif out.is_dir() and any(out.iterdir()) and not saved.is_file() and not overwrite:
        raise SlimlmError(f"--out {out} is not empty and holds no slimlm compare results.",
                          "Choose another --out, or pass --overwrite to write the report beside its files.")


def start_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Create --out, discard our earlier files under --overwrite, and pin the settings."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OUR_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    from slimlm.toolkit.eval import write_json

    write_json(settings, out / "settings.json")


# -- model identity, size on disk -------------------------------------------------------------------

def model_folder(model: dict) -> Path | None:
    """The files behind a model: its folder or .gguf; a built-in's cached folder; a hub id's cached snapshot."""
    from slimlm.toolkit.models import builtin_model_dir

    if model["kind"] == "builtin":
        return builtin_model_dir(model["spec"])
    if model["kind"] == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model["spec"], local_files_only=True))
        except Exception:  # not cached (yet): loading will fetch it; identity is then the id alone
            return None
    return Path(model["spec"]).expanduser().resolve()


def _files(folder: Path) -> list[Path]:
    return [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())


def identity(model: dict, plan: dict | None = None) -> dict:
    """What makes a model the same model: its kind, location, every file's size and mtime, an export's manifest
    hash, and how its speed is measured (`speculation_plan`; only where speculative, so plain models keep the
    keys of folders made before speculation was measured, and an exit export's plain figures are never reused)."""
    folder = model_folder(model)
    ident = {"kind": model["kind"], "location": str(folder) if folder else model["spec"]}
    if folder is not None:
        ident["files"] = {str(p.relative_to(folder)) if p != folder else p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                          for p in _files(folder)}
    if model["kind"] == "export":
        ident["manifest_sha256"] = file_sha256(folder / "slimlm.json")
    if plan is not None:
        ident["speculation"] = plan
    return ident


def disk_bytes(model: dict) -> int | None:
    """The model's files; with a draft model, the draft's too (serving needs both)."""
    folders = [model_folder(model)]
    if model.get("draft"):
        folders.append(model_folder({"spec": model["draft"], "kind": model["draft_kind"]}))
    return None if None in folders else sum(p.stat().st_size for f in folders for p in _files(f))


def cache_key(ident: dict, settings: dict) -> str:
    blob = json.dumps({"identity": ident, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- measurements -------------------------------------------------------------------------------------

def _accuracy_job(spec: str, settings: dict) -> dict:
    """In a fresh process: load, evaluate, count parameters, read the peak memory. Errors come back as data."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported before the baseline

    from slimlm.recipes.cli import quiet_libraries
    from slimlm.toolkit.eval import evaluate
    from slimlm.toolkit.models import load

    quiet_libraries()
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    reset = reset_peak_rss()
    before = peak_rss_bytes()  # after a reset: the RSS now; without one, the peak so far (a lower bound below)
    try:
        model, tokenizer = load(spec, dtype=settings["eval_dtype"], device=settings["device"])
        params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
        accuracy = evaluate(model, tokenizer, data=settings["data"], tasks=settings["tasks"],
                            split=settings["split"], window=settings["window"], max_windows=settings["max_windows"],
                            batch_size=settings["eval_batch_size"], progress=False,
                            spread_windows=settings.get("spread_windows", False))
    except SlimlmError as err:
        return {"error": f"{spec}: {err.what}", "hint": err.hint}
    except (torch.OutOfMemoryError, MemoryError) as err:  # a GPU's (a CPU process is killed: BrokenProcessPool)
        return {"error": f"{spec}: out of memory while evaluating ({type(err).__name__}).",
                "hint": "Lower --eval-batch-size or --window, or free memory, and run again to resume."}
    peak = peak_rss_bytes()
    memory = {"peak_rss_bytes": peak, "baseline_rss_bytes": before, "load_eval_bytes": peak - before,
              "exact": reset}
    if str(settings["device"]).startswith("cuda"):
        memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()  # a fresh process: nothing to reset
    return {"accuracy": accuracy, "params": params, "memory": memory}


def measure_accuracy(spec: str, settings: dict) -> dict:
    """Accuracy, parameter count and peak memory of one model, measured in a spawned process."""
    from slimlm.recipes import compare as this  # by module name, also when run as `python recipes/compare.py`

    return in_fresh_process(this._accuracy_job, spec, settings, what=f"evaluating {spec}",
                            hint="Lower --eval-batch-size or --window, or free memory, and run again to resume.")


NUM_DRAFT = 4  # most drafts per step: `slimlm serve --speculative self`'s default
PROMPT_LOOKUP = 3  # `slimlm serve --speculative ngram`'s default: the text's last 3 (down to 2) tokens looked up


def speculation_plan(model: dict, settings: dict) -> dict | None:
    """How `model`'s speed is measured: None for plain decoding; for an early-exit export under --speculative
    auto, self-speculative decoding from its shallowest exit (through its own norm and lens where it has them),
    the adaptive policy, at most NUM_DRAFT drafts: what `slimlm serve DIR --speculative self` runs. For
    `MODEL+draft:DRAFT`, draft-model speculative decoding, adaptive, at most NUM_DRAFT drafts (`slimlm serve
    MODEL --speculative draft --draft-model DRAFT`); the draft's files join the plan, so its cache key. For
    `MODEL+ngram`, prompt-lookup drafts (`slimlm serve MODEL --speculative ngram`), adaptive, at most NUM_DRAFT;
    `MODEL+draft:DRAFT+ngram` both (`... --draft-model DRAFT --prompt-lookup 3`: lookup first, then the draft)."""
    lookup = {"prompt_lookup": PROMPT_LOOKUP} if model.get("ngram") else {}
    if model.get("draft"):  # asked for by name: timed with its draft whatever --speculative says
        draft = {"spec": model["draft"], "kind": model["draft_kind"]}
        return {"draft_model": model["draft"], "draft_identity": identity(draft), "num_draft": NUM_DRAFT,
                "adaptive": True, **lookup}
    if lookup:  # asked for by name, as a draft model is
        return {**lookup, "num_draft": NUM_DRAFT, "adaptive": True}
    if settings.get("speculative", "auto") == "off" or model["kind"] != "export":
        return None
    from slimlm.toolkit.early_exit import read_exit_spec

    spec = read_exit_spec(model["spec"], verify=False)
    if spec is None:
        return None
    return {"exit_layer": spec.layers[0], "num_draft": NUM_DRAFT, "adaptive": True, "norm": spec.norm}


def speed_prompts(tokenizer, settings: dict, n: int) -> list[list[int]]:
    """The speed measurement's first `n` prompts: --prompts-file's, --task's, or `prompt_len` tokens of held-out text."""
    from slimlm.serve.bench import bench_prompts, file_prompts, task_prompts

    if settings.get("speed_prompts_file"):
        try:
            return file_prompts(tokenizer, settings["speed_prompts_file"], n)
        except ValueError as e:
            raise SlimlmError(str(e), "Fix the file (token ids must be below the vocabulary's size).") from None
    if settings.get("speed_task"):
        return task_prompts(tokenizer, n, settings["speed_task"])
    return bench_prompts(tokenizer, n, settings["prompt_len"])


def _engine(spec: str, settings: dict, plan: dict | None = None):
    """`spec` loaded into slimlm's serving engine, with a KV cache just large enough for the benchmark, drafting
    from an exit or a draft model where `plan` (`speculation_plan`) says so."""
    from slimlm.serve.engine.engine import ContextTooLong, EngineConfig, LLMEngine
    from slimlm.serve.engine.speculative import SpeculativeConfig
    from slimlm.toolkit.early_exit import draft_weights, read_exit_spec
    from slimlm.toolkit.models import load

    hf_model, tokenizer = load(spec, dtype=settings["dtype"], device=settings["device"])
    longest = settings["prompt_len"]
    if settings.get("speed_prompts_file") or settings.get("speed_task"):
        longest = max(map(len, speed_prompts(tokenizer, settings, settings["num_requests"])))
    length = longest + settings["gen_len"]
    blocks = settings["concurrency"] * (-(-length // 16) + 1) + 1  # every request in flight, plus one spare
    speculative = None
    if plan is not None and "draft_model" in plan:
        draft, draft_tokenizer = load(plan["draft_model"], dtype=settings["dtype"], device=settings["device"])
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SlimlmError(f"the draft {plan['draft_model']} has another tokenizer than {spec}.",
                              "A draft must share the model's tokenizer (e.g. a quantized or pruned variant of it).")
        speculative = SpeculativeConfig(draft_model=draft, num_draft=plan["num_draft"], adaptive=plan["adaptive"],
                                        prompt_lookup=plan.get("prompt_lookup", 0))
    elif plan is not None and "prompt_lookup" in plan:
        speculative = SpeculativeConfig(prompt_lookup=plan["prompt_lookup"], num_draft=plan["num_draft"],
                                        adaptive=plan["adaptive"])
    elif plan is not None:
        norm, proj = draft_weights(spec, read_exit_spec(spec, verify=False), plan["exit_layer"])
        speculative = SpeculativeConfig(exit_layer=plan["exit_layer"], num_draft=plan["num_draft"], exit_norm=norm,
                                        exit_proj=proj, adaptive=plan["adaptive"])
    config = EngineConfig(max_num_seqs=settings["concurrency"], num_blocks=blocks, max_model_len=length + 1,
                          speculative=speculative)
    try:
        return LLMEngine(hf_model, tokenizer, config, model_name=spec)
    except ValueError as err:
        raise SlimlmError(f"cannot serve {spec}: {err}",  # a context or window shorter than prompt + new tokens:
                          "Lower --prompt-len and --gen-len to fit it." if isinstance(err, ContextTooLong) else
                          "Pass --speculative off to measure it plainly." if plan else None) from err


def speculation_result(plan: dict, stats: list[dict]) -> dict:
    """`plan` and what it achieved, from the engines' counters (`LLMEngine.stats()`, one per load): over the
    warm-ups and every repetition, batch 1 and online together; batches over `max_batch` decode plainly."""
    from slimlm.serve.engine.speculative import SpeculativeConfig

    drafted = sum(s["spec_draft_tokens_total"] for s in stats)
    accepted = sum(s["spec_accepted_tokens_total"] for s in stats)
    steps = sum(s["spec_steps_total"] for s in stats)
    emitted = sum(s["spec_mean_accepted_length"] * s["spec_steps_total"] for s in stats)  # its mean is emitted / steps
    return {**plan, "max_batch": SpeculativeConfig.max_batch, "drafted_tokens": drafted, "steps": steps,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": emitted / steps if steps else None}


def measure_speed(spec: str, settings: dict, progress=None, plan: dict | None = None) -> dict:
    """Load `spec` in the serving engine here and run `serve.bench.benchmark` at batch 1 and at fixed concurrency
    (with settings["speed_rounds"] > 1, `measure_speeds`'s rounds for this one model, less its raw values).
    With a `plan` (`speculation_plan`) the engine drafts from an exit, and the result holds `speculation`."""
    import gc

    if settings.get("speed_rounds", 1) > 1:
        result = measure_speeds([spec], settings, progress, plans=[plan])[0]
        del result["values"]  # measured alone: ratios divide medians, not repetitions side by side
        return result

    from slimlm.serve.bench import benchmark

    engine = _engine(spec, settings, plan)
    result = benchmark(engine, None, [1], settings["concurrency"], None, settings["num_requests"],
                       settings["prompt_len"], settings["gen_len"], settings["reps"], progress=progress,
                       task=settings.get("speed_task"), prompts_file=settings.get("speed_prompts_file"))
    speculation = {"speculation": speculation_result(plan, [engine.stats()])} if plan else {}
    del engine
    gc.collect()  # the next model loads into the memory this one held (torch's caching allocator keeps it on GPU)
    online = result["rows"][f"engine online c={settings['concurrency']}"]
    batch1 = result["rows"]["engine batch 1"]
    return {"figures": {"batch1_tok_s": batch1["tokens_per_s"], "batch1_decode_tok_s": batch1["decode_tokens_per_s"],
                        "online_tok_s": online["tokens_per_s"], "ttft_p50_ms": online["ttft_p50_ms"]},
            "rows": result["rows"], "bench_settings": result["settings"], **speculation}


def measure_speeds(specs: list[str], settings: dict, progress=None, plans: list | None = None) -> list[dict]:
    """Speed of several models at once: each in its own engine, all loaded together, their repetitions
    alternated (`serve.bench.benchmark_interleaved`), so per-repetition ratios to the first (the base)
    see the same machine. Each result is `measure_speed`'s plus `values`, the per-repetition figures.

    With settings["speed_rounds"] = N > 1 the models are loaded N times, --reps alternated repetitions
    each time, and the figures span all N x reps: a model's speed also moves with where its weights land
    in memory (a fresh load of the same models in the same process moved int4's batch-1 ratio between
    1.28x and 1.52x), which repetitions over one load do not see and a second run would.
    `plans`: one `speculation_plan` (or None) per model, as in `measure_speed`."""
    import gc

    from slimlm.recipes import compare_report
    from slimlm.serve.bench import Spread, benchmark_interleaved

    rounds = settings.get("speed_rounds", 1)
    say = progress or (lambda msg: None)
    values, plans = [None] * len(specs), plans or [None] * len(specs)
    stats = [[] for _ in specs]  # per model, its engines' speculation counters, one per round
    for rnd in range(rounds):
        tag = f"round {rnd + 1}/{rounds}, " if rounds > 1 else ""
        engines = []
        for i, spec in enumerate(specs):
            say(f"{tag}loading {i + 1}/{len(specs)}: {spec}")
            engines.append(_engine(spec, settings, plans[i]))
        results = benchmark_interleaved(engines, settings["concurrency"], settings["num_requests"],
                                        settings["prompt_len"], settings["gen_len"], settings["reps"],
                                        progress=lambda msg, tag=tag: say(tag + msg),
                                        make_prompts=lambda tokenizer, n: speed_prompts(tokenizer, settings, n))
        for i, plan in enumerate(plans):
            if plan:
                stats[i].append(engines[i].stats())
        del engines
        gc.collect()
        for i, r in enumerate(results):
            values[i] = r["values"] if values[i] is None else {k: v + r["values"][k] for k, v in values[i].items()}
    label = f"engine online c={settings['concurrency']}"
    out = []
    for r, v, plan, st in zip(results, values, plans, stats):  # the last round's settings; every round's figures
        spread = {k: Spread.of(vals).__dict__ for k, vals in v.items()}
        rows = {"engine batch 1": {"tokens_per_s": spread["batch1_tok_s"],
                                   "decode_tokens_per_s": spread["batch1_decode_tok_s"]},
                label: {"tokens_per_s": spread["online_tok_s"], "ttft_p50_ms": spread["ttft_p50_ms"],
                        "tpot_p50_ms": spread["tpot_p50_ms"]}}
        out.append({"figures": {k: spread[k] for k in compare_report.SPEED_FIGURES},
                    "rows": rows, "bench_settings": {**r["settings"], "speed_rounds": rounds}, "values": v,
                    **({"speculation": speculation_result(plan, st)} if plan else {})})
    return out


def fit_together(entries: list[dict], settings: dict) -> bool:
    """Whether the models' engines can all be held at once: three times their files (weights as loaded, the
    engine's copy, slack) within half the free memory of the device (MemAvailable; CUDA's free memory)."""
    need = 3 * sum(e.get("disk_bytes") or 0 for e in entries)
    if any(e.get("disk_bytes") is None for e in entries):
        return False
    if settings["device"].startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    else:
        meminfo = Path("/proc/meminfo")
        found = meminfo.exists() and next((int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                                           if line.startswith("MemAvailable:")), None)
        free = found or 0
    return need <= free / 2


# -- the comparison -------------------------------------------------------------------------------

def compare(models: list[dict], settings: dict, out: Path, command: str = "", progress: bool = True,
            extra: dict | None = None, interleave: bool | None = None) -> dict:
    """Measure what the cache lacks (module doc), write the report files, return the report dict.

    `models` come from `check_models` (the first is the base), `out` from `check_out` then `start_out`.
    Each measurement goes to the cache as soon as it is done. `extra` joins the report as it is (the
    pipeline passes its variants, failed ones included, under "pipeline"). `interleave` None: alternate
    the models' speed repetitions (`measure_speeds`) where they fit in memory together (`fit_together`),
    else measure them one after the other (`measure_speed`); True or False forces either."""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from slimlm.recipes import compare_report
    from slimlm.serve.bench import Spread
    from slimlm.toolkit.eval import write_json

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + os.urandom(3).hex()
    entries = []
    for m in models:
        ident = identity(m, speculation_plan(m, settings))
        key = cache_key(ident, settings)
        path = out / "cache" / f"{key}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        entries.append({**cached, **m, "key": key, "identity": ident, "cache_file": str(path),
                        "disk_bytes": disk_bytes(m), "measured_now": {"accuracy": False, "speed": False}})
    base = entries[0]
    save = lambda e: write_json({k: v for k, v in e.items() if k != "measured_now"}, e["cache_file"])  # noqa: E731
    failed = []  # variants that could not be measured: in the report with their error, not in the table

    def fail(e, stage: str, err: SlimlmError) -> None:
        if e is base:
            raise err  # every ratio divides by the base
        failed.append({"label": e["label"], "spec": e["spec"], "stage": stage, "error": err.what, "hint": err.hint})
        e["failed"] = True

    def record(e, speed, base_speed):
        e["speed"] = {**speed, "run": run, "base_key": base["key"], "base_figures": base_speed["figures"]}
        if "values" in speed:  # alternated: one ratio per repetition, each to the base's run beside it
            e["speed"]["ratios"] = {key: Spread.of([v / b for v, b in zip(values, base_speed["values"][key])]).__dict__
                                    for key, values in speed["values"].items()}
        e["measured_now"]["speed"] = True
        save(e)

    todo_accuracy = [e for e in entries if "accuracy" not in e]
    # A cached speed from an older slimlm that lacks a figure of today's table is measured again.
    stale = [e for e in entries if e.get("speed", {}).get("base_key") != base["key"]
             or not set(compare_report.SPEED_FIGURES) <= set(e["speed"].get("figures", {}))]
    # Nothing to time where every speed, the base's too, is cached (each variant's ratio is to the base of the run
    # that timed it): the report is written again from the cache.
    todo_speed = [base] + [e for e in stale if e is not base] if stale else []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
        acc_task = bar.add_task("accuracy", total=len(todo_accuracy))
        for e in todo_accuracy:
            twin = (e.get("draft") or e.get("ngram")) and next(
                (o for o in entries if not o.get("draft") and not o.get("ngram") and o["spec"] == e["spec"]
                 and "accuracy" in o), None)
            if twin:  # MODEL+draft:DRAFT (+ngram) is MODEL's accuracy: lossless speculation changes no output
                e.update({k: twin[k] for k in ("accuracy", "params", "memory")}, accuracy_of=twin["label"])
            else:
                bar.update(acc_task, description=f"accuracy + memory: {e['label']} (subprocess)")
                try:
                    e.update(measure_accuracy(e["spec"], settings))
                except SlimlmError as err:
                    fail(e, "accuracy", err)
            bar.advance(acc_task)
            if not e.get("failed"):
                e["measured_now"]["accuracy"] = True
                save(e)
        todo_memory = [e for e in entries if "serving_memory" not in e and not e.get("failed")]
        mem_task = bar.add_task("serving memory", total=len(todo_memory))
        for e in todo_memory:
            bar.update(mem_task, description=f"serving memory: {e['label']} (subprocess)")
            try:
                e["serving_memory"] = measure_serving_memory(e["spec"], settings, e["identity"].get("speculation"))
                save(e)
            except SlimlmError as err:
                fail(e, "serving memory", err)
            bar.advance(mem_task)
        todo_speed = [e for e in todo_speed if not e.get("failed")]
        if todo_speed == [base] and base not in stale:
            todo_speed = []  # only failed variants needed timing: the base's cached speed stands
        together = fit_together(todo_speed, settings) if interleave is None else interleave
        alternated = False
        if together and len(todo_speed) > 1:
            speed_task = bar.add_task("speed", total=None)
            say = lambda msg: bar.update(speed_task, description=f"speed, {len(todo_speed)} models alternated: {msg}")  # noqa: E731
            try:
                speeds = measure_speeds([e["spec"] for e in todo_speed], settings, progress=say,
                                        plans=[e["identity"].get("speculation") for e in todo_speed])
                for e, speed in zip(todo_speed, speeds):
                    record(e, speed, speeds[0])
                alternated = True
            except SlimlmError as err:  # one model failed them all: time each alone, so the others still get timed
                bar.console.print(escape(f"compare: alternated timing stopped ({err.what}); timing the models one "
                                         "after another instead"), highlight=False)
            bar.update(speed_task, total=1, completed=1)
        if not alternated:
            speed_task = bar.add_task("speed", total=len(todo_speed))
            first = None
            for e in todo_speed:
                say = lambda msg, label=e["label"]: bar.update(speed_task, description=f"speed: {label}: {msg}")  # noqa: E731
                try:
                    speed = measure_speed(e["spec"], settings, progress=say, plan=e["identity"].get("speculation"))
                    first = first or speed  # the base comes first in every run
                    record(e, speed, first)
                except SlimlmError as err:
                    fail(e, "speed", err)
                bar.advance(speed_task)

    report = {"command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "run": run,
              "settings": settings, "machine": compare_report.machine(), "out": str(out),
              "models": [{k: v for k, v in e.items() if k != "cache_file"} for e in entries if not e.get("failed")],
              "failed": failed, **(extra or {})}
    return compare_report.write_report(report, out)


def run_compare(args) -> int:
    """The `slimlm compare` verb: check everything, measure what is missing, print and write the report."""
    from rich.console import Console

    from slimlm.recipes import compare_report

    settings = settings_from_args(args)
    models = check_models([args.base, *args.variants])
    out = Path(args.out)
    check_out(out, settings, args.overwrite)
    start_out(out, settings, args.overwrite)
    interleave = {"auto": None, "alternate": True, "sequential": False}[args.speed_order]
    report = compare(models, settings, out, command=getattr(args, "command_line", ""), interleave=interleave)
    compare_report.print_report(report, Console())
    if report["failed"]:
        print(f"slimlm compare: {len(report['failed'])} model(s) could not be measured: "
              f"{', '.join(f['label'] for f in report['failed'])} (see the report)", file=sys.stderr)
    return 1 if report["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """`python recipes/compare.py ...`: the same options as `slimlm compare`."""
    from slimlm.recipes.cli import run_script

    return run_script("compare", argv)


if __name__ == "__main__":
    sys.exit(main())
