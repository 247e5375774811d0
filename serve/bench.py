"""`slimlm bench`: offline throughput and online load of the engine, with a baseline in the same run.

Offline: B prompts of `prompt_len` tokens (held-out text) generate exactly `gen_len` tokens each
(greedy, EOS ignored), all submitted at once. Online: requests arrive either at fixed concurrency C
(a new one whenever one finishes) or as a Poisson process at `rate` requests/s; per request we
record time to first token (TTFT), time per output token after the first (TPOT) and every
inter-token latency (ITL). Besides tokens/s over the whole run (prefill included), a run reports
decode tokens/s: the tokens after each request's first, over the time from the first first token to
the last request's end (at batch 1, 1 / TPOT: the speed of decoding alone; 0 when no request made a
second token). Every figure is measured after a warm-up, `reps` times, and reported as median with
min and max. `baseline="hf"` runs `transformers.generate` (left-padded batches) on the
same prompts and lengths in the same run, so the ratios compare like with like on a noisy machine.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from .engine.engine import LLMEngine
from .sampling_params import SamplingParams


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}, {self.max:.{digits}f}]"


@dataclass
class RunStats:
    tokens_per_s: float
    requests_per_s: float
    decode_tokens_per_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def bench_prompts(tokenizer, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """n distinct prompts of exactly prompt_len tokens, cut from the held-out part of builtin:wiki."""
    from slimlm.toolkit.data import load_texts, token_stream

    stream = token_stream(load_texts("builtin:wiki", split="validation"), tokenizer)
    if stream.numel() < n * prompt_len:
        raise ValueError(f"{n} prompts of {prompt_len} tokens need {n * prompt_len} tokens of held-out text; "
                         f"there are {stream.numel()}")
    starts = random.Random(seed).sample(range(stream.numel() // prompt_len), n)
    return [stream[s * prompt_len:(s + 1) * prompt_len].tolist() for s in starts]


TASKS = {"quote": "Repeat the following text word for word.", "summarize": "Summarize the following text in two sentences."}


def task_prompts(tokenizer, n: int, task: str, seed: int = 0, min_words: int = 40,
                 max_words: int = 120) -> list[list[int]]:
    """n chat prompts (the tokenizer's chat template) that ask for work on a held-out paragraph of builtin:wiki
    (`min_words`..`max_words` words of prose): "quote" has the model repeat it, "summarize" sum it up.
    Outputs that reuse their input's words, the workload prompt-lookup drafting is for."""
    from slimlm.toolkit.data import load_texts

    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    paragraphs = [line for text in load_texts("builtin:wiki", split="validation") for line in text.split("\n")
                  if "<" not in line and min_words <= len(line.split()) <= max_words]
    if len(paragraphs) < n:
        raise ValueError(f"{n} prompts need {n} paragraphs of {min_words}-{max_words} words; there are {len(paragraphs)}")
    out = []
    for text in random.Random(seed).sample(paragraphs, n):
        out.append(chat_ids(tokenizer, [{"role": "user", "content": f"{TASKS[task]}\n\n{text}"}]))
    return out


def chat_ids(tokenizer, messages: list) -> list[int]:
    """`messages` through the tokenizer's chat template, ready for the assistant's answer, as token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # some tokenizers return a BatchEncoding


def prompt_rows(path: str, n: int) -> list[dict]:
    """The first `n` prompts of a JSONL file, checked but not yet tokenized: one object a line, {"prompt":
    "text"}, {"messages": [...]} (chat messages) or {"prompt_token_ids": [ids]}. ValueError naming the line of a
    bad one, or when the file holds fewer than `n` (repeating prompts would measure the prefix cache)."""
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(rows) == n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected an object with \"prompt\", \"messages\" or "
                                 f"\"prompt_token_ids\", got {type(row).__name__}")
            ids = row.get("prompt_token_ids")
            given = [k for k in ("prompt", "messages", "prompt_token_ids") if k in row]
            if len(given) > 1:  # which one would be timed is not for the reader to guess
                raise ValueError(f"{path}, line {number}: give one of \"prompt\", \"messages\" and "
                                 f"\"prompt_token_ids\", not {' and '.join(given)}")
            if not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list) or (
                    isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids))):
                raise ValueError(f"{path}, line {number}: expected \"prompt\" (text), \"messages\" (a chat) or "
                                 f"\"prompt_token_ids\" (ids >= 0), got keys {sorted(row)}")
            bad = next((i for i, m in enumerate(row.get("messages") or []) if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str))), None)
            if bad is not None:
                raise ValueError(f"{path}, line {number}: message {bad} must be an object with a string \"role\" "
                                 "and a string \"content\"")
            if not (row.get("prompt") or row.get("messages") or ids):
                raise ValueError(f"{path}, line {number}: the prompt is empty")
            rows.append({**row, "line": number})
    if len(rows) < n:
        raise ValueError(f"{path} holds {len(rows)} prompts; this run needs {n} (the largest batch size, or the "
                         f"online requests: --num-requests, default twice --concurrency)")
    return rows


def file_prompts(tokenizer, path: str, n: int) -> list[list[int]]:
    """`prompt_rows` as token ids: text tokenized, chats through the tokenizer's chat template, ids checked
    against the vocabulary (ValueError naming the line)."""
    out = []
    for row in prompt_rows(path, n):
        if isinstance(row.get("prompt"), str):
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        elif isinstance(row.get("messages"), list):
            ids = chat_ids(tokenizer, row["messages"])
        else:
            ids = row["prompt_token_ids"]
            if max(ids) >= len(tokenizer):
                raise ValueError(f"{path}, line {row['line']}: token id {max(ids)} is outside the vocabulary "
                                 f"({len(tokenizer)} tokens)")
        if not ids:
            raise ValueError(f"{path}, line {row['line']}: the prompt is empty")
        out.append(list(ids))
    return out


def run_engine(engine: LLMEngine, prompts: list[list[int]], gen_len: int, concurrency: int | None = None,
               rate: float | None = None, seed: int = 0) -> RunStats:
    """Push all prompts through the engine: at once (offline), at fixed concurrency, or Poisson at `rate`."""
    engine.block_manager.reset_prefix_cache()  # every repetition starts cold: no reuse across reps
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    rng = random.Random(seed)
    start = time.perf_counter()
    arrivals = [start] * len(prompts)
    if rate:
        t = start
        for i in range(len(prompts)):
            t += rng.expovariate(rate)
            arrivals[i] = t
    pending = list(range(len(prompts)))
    in_flight: dict[str, float] = {}
    last_time: dict[str, float] = {}
    last_count: dict[str, int] = {}
    stats = RunStats(0.0, 0.0)
    produced = decoded = 0
    first_token_at = last_done = None

    def admit(now: float) -> None:
        while pending and (concurrency is None or len(in_flight) < concurrency) and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            rid = str(i)
            # Open loop (rate): the request arrived at its Poisson time, queueing counts in its TTFT. Closed loop
            # (concurrency): its client sends it only now, when a slot frees, so its clock starts now.
            sent = arrivals[i] if rate else now
            engine.add_request(rid, prompts[i], params, arrival_time=sent)
            in_flight[rid] = sent
            last_count[rid] = 0

    while pending or in_flight:
        now = time.perf_counter()
        admit(now)
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, arrivals[pending[0]] - now)))
            continue
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            rid, n = out.request_id, len(out.outputs[0].token_ids)
            if n > last_count[rid]:
                if last_count[rid] == 0:
                    stats.ttft.append(now - in_flight[rid])
                    first_token_at = first_token_at or now
                else:
                    stats.itl.append(now - last_time[rid])
                decoded += n - max(last_count[rid], 1)
                produced += n - last_count[rid]
                last_count[rid], last_time[rid] = n, now
            if out.finished:
                first = out.metrics.get("first_token") or now
                if n > 1:
                    stats.tpot.append((now - first) / (n - 1))
                del in_flight[rid]
                last_done = now
    wall = time.perf_counter() - start
    stats.tokens_per_s = produced / wall
    if decoded and last_done > first_token_at:
        stats.decode_tokens_per_s = decoded / (last_done - first_token_at)
    stats.requests_per_s = len(prompts) / wall
    return stats


def run_hf(model, prompts: list[list[int]], gen_len: int, pad_id: int) -> float:
    """transformers.generate on one left-padded batch; returns generated tokens per second."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len,
                       do_sample=False, pad_token_id=pad_id)
    return len(prompts) * gen_len / (time.perf_counter() - start)


def prompts_needed(batch_sizes, concurrency: int | None, num_requests: int | None, rate: float | None = None) -> int:
    """Distinct prompts a `benchmark` run uses: the largest batch size, or the online requests if more."""
    online = num_requests or (2 * concurrency if concurrency else 32) if concurrency or rate else 0
    return max(max(batch_sizes, default=1), online)


def benchmark(engine: LLMEngine, hf_model=None, batch_sizes=(1, 16), concurrency: int | None = 32,
              rate: float | None = None, num_requests: int | None = None, prompt_len: int = 128,
              gen_len: int = 128, reps: int = 3, progress=None, task: str | None = None,
              prompts_file: str | None = None) -> dict:
    """Run every configured measurement; returns a JSON-ready dict of Spreads and ratios. `task` ("quote",
    "summarize"): chat prompts around held-out paragraphs (`task_prompts`) instead of `prompt_len` tokens of
    text; `prompts_file`: the user's own prompts (`file_prompts`)."""
    tok = engine.tokenizer
    n = prompts_needed(batch_sizes, concurrency, num_requests, rate)
    n_online = num_requests or (2 * concurrency if concurrency else 32)
    if prompts_file is not None:
        prompts = file_prompts(tok, prompts_file, n)
    else:
        prompts = bench_prompts(tok, n, prompt_len) if task is None else task_prompts(tok, n, task)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(engine.eos_token_ids), 0)
    rows: dict[str, dict] = {}
    say = progress or (lambda msg: None)

    def measure(name, fn):
        say(f"{name}: warm-up")
        fn()
        values = []
        for r in range(reps):
            say(f"{name}: repetition {r + 1}/{reps}")
            values.append(fn())
        return values

    for b in batch_sizes:
        runs = measure(f"engine batch {b}", lambda b=b: run_engine(engine, prompts[:b], gen_len))
        rows[f"engine batch {b}"] = {"tokens_per_s": Spread.of([r.tokens_per_s for r in runs]).__dict__,
                                     "decode_tokens_per_s": Spread.of([r.decode_tokens_per_s for r in runs]).__dict__}
        if hf_model is not None:
            hf = measure(f"hf batch {b}", lambda b=b: run_hf(hf_model, prompts[:b], gen_len, pad))
            rows[f"hf batch {b}"] = {"tokens_per_s": Spread.of(hf).__dict__}
    if concurrency or rate:
        label = (f"engine online rate={rate}/s" + (f" c<={concurrency}" if concurrency else "") if rate
                 else f"engine online c={concurrency}")
        runs = measure(label, lambda: run_engine(engine, prompts[:n_online], gen_len, concurrency, rate))
        rows[label] = {
            "tokens_per_s": Spread.of([r.tokens_per_s for r in runs]).__dict__,
            "requests_per_s": Spread.of([r.requests_per_s for r in runs]).__dict__,
            "ttft_p50_ms": Spread.of([1e3 * percentile(r.ttft, 50) for r in runs]).__dict__,
            "ttft_p99_ms": Spread.of([1e3 * percentile(r.ttft, 99) for r in runs]).__dict__,
            "tpot_p50_ms": Spread.of([1e3 * percentile(r.tpot, 50) for r in runs]).__dict__,
            "itl_p50_ms": Spread.of([1e3 * percentile(r.itl, 50) for r in runs]).__dict__,
            "itl_p99_ms": Spread.of([1e3 * percentile(r.itl, 99) for r in runs]).__dict__,
        }
    ratios = {}
    hf1 = rows.get("hf batch 1", {}).get("tokens_per_s", {}).get("median")
    for name, row in rows.items():
        if name.startswith("engine") and hf1:
            ratios[f"{name} / hf batch 1"] = row["tokens_per_s"]["median"] / hf1
        b = name.split()[-1]
        if name.startswith("engine batch") and f"hf batch {b}" in rows:
            ratios[f"{name} / hf batch {b}"] = row["tokens_per_s"]["median"] / rows[f"hf batch {b}"]["tokens_per_s"]["median"]
    biggest_hf = max((int(n.split()[-1]) for n in rows if n.startswith("hf batch")), default=None)
    if biggest_hf and biggest_hf != 1:
        for name, row in rows.items():
            if name.startswith("engine online"):
                ratios[f"{name} / hf batch {biggest_hf}"] = (
                    row["tokens_per_s"]["median"] / rows[f"hf batch {biggest_hf}"]["tokens_per_s"]["median"])
    return {"rows": rows, "ratios": ratios,
            "settings": {"batch_sizes": list(batch_sizes), "concurrency": concurrency, "rate": rate,
                         # what the run used, and only that: prompts from a file or a task have their own lengths
                         "num_requests": n_online if concurrency or rate else None,
                         **({"prompts_file": prompts_file} if prompts_file is not None else
                            {"task": task} if task is not None else {"prompt_len": prompt_len}),
                         "gen_len": gen_len, "reps": reps,
                         "threads": torch.get_num_threads(), "dtype": str(engine.model.dtype)}}


def benchmark_interleaved(engines: list[LLMEngine], concurrency: int, num_requests: int | None = None,
                          prompt_len: int = 128, gen_len: int = 128, reps: int = 3, progress=None,
                          make_prompts=None) -> list[dict]:
    """`benchmark`'s batch-1 and fixed-concurrency runs for several engines, alternated repetition by repetition.
    `make_prompts(tokenizer, n)`: the prompts (default: `bench_prompts` of `prompt_len` tokens).

    After one warm-up run of every engine, each repetition runs every engine once, starting one engine
    later each time (the first engine of a repetition can meet a machine in another state than the
    last). A change of load on a shared machine then falls on all engines alike, and the ratio of two
    engines within one repetition stays put where figures measured engine after engine (minutes
    apart) drift. Returns one dict per engine, in order: `rows` as `benchmark` names them (Spreads as
    dicts) and `values`, the raw per-repetition figures `{"batch1_tok_s", "batch1_decode_tok_s",
    "online_tok_s", "ttft_p50_ms", "tpot_p50_ms"}` in repetition order, from which callers take per-repetition ratios.
    """
    if not engines or reps < 1 or concurrency < 1:
        raise ValueError("need at least one engine, reps >= 1 and concurrency >= 1, "
                         f"got {len(engines)} engine(s), reps {reps}, concurrency {concurrency}")
    n_online = num_requests or 2 * concurrency
    make_prompts = make_prompts or (lambda tokenizer, n: bench_prompts(tokenizer, n, prompt_len))
    prompts = [make_prompts(e.tokenizer, n_online) for e in engines]
    say = progress or (lambda msg: None)
    label = f"engine online c={concurrency}"
    runs = {"batch 1": [[] for _ in engines], f"c={concurrency}": [[] for _ in engines]}
    jobs = {"batch 1": lambda i: run_engine(engines[i], prompts[i][:1], gen_len),
            f"c={concurrency}": lambda i: run_engine(engines[i], prompts[i], gen_len, concurrency)}
    for name, job in jobs.items():
        for i in range(len(engines)):
            say(f"{name}: warm-up, engine {i + 1}/{len(engines)}")
            job(i)
        for r in range(reps):
            for step in range(len(engines)):
                i = (r + step) % len(engines)
                say(f"{name}: repetition {r + 1}/{reps}, engine {i + 1}/{len(engines)}")
                runs[name][i].append(job(i))
    results = []
    for engine, batch, online in zip(engines, runs["batch 1"], runs[f"c={concurrency}"]):
        values = {"batch1_tok_s": [r.tokens_per_s for r in batch],
                  "batch1_decode_tok_s": [r.decode_tokens_per_s for r in batch],
                  "online_tok_s": [r.tokens_per_s for r in online],
                  "ttft_p50_ms": [1e3 * percentile(r.ttft, 50) for r in online],
                  "tpot_p50_ms": [1e3 * percentile(r.tpot, 50) for r in online]}
        rows = {"engine batch 1": {"tokens_per_s": Spread.of(values["batch1_tok_s"]).__dict__,
                                   "decode_tokens_per_s": Spread.of(values["batch1_decode_tok_s"]).__dict__},
                label: {"tokens_per_s": Spread.of(values["online_tok_s"]).__dict__,
                        "ttft_p50_ms": Spread.of(values["ttft_p50_ms"]).__dict__,
                        "tpot_p50_ms": Spread.of(values["tpot_p50_ms"]).__dict__}}
        results.append({"rows": rows, "values": values,
                        "settings": {"batch_sizes": [1], "concurrency": concurrency, "num_requests": n_online,
                                     "prompt_len": prompt_len, "gen_len": gen_len, "reps": reps, "interleaved": True,
                                     "threads": torch.get_num_threads(), "dtype": str(engine.model.dtype)}})
    return results
