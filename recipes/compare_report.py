"""The report of `slimlm compare`: figures with ratios to the base, a markdown and a rich table, a Pareto plot.

`compare.py` measures and caches; this file only turns its measurements into what a person reads:

- `add_figures(report)` puts, beside each model's raw measurements, one entry per table column:
  `{"value", "ratio", "min", "max", "earlier_run"}`. The ratio is always value / base value (the base
  is 1.00x). Speed ratios divide by the base *as measured in the same run as the model* (a model whose
  speed came from the cache keeps the base figures of its own run; see compare.py), so two numbers
  measured minutes apart on a noisy machine are the only ones ever divided.
- `markdown(report)` and `rich_table(report)` show the same cells; `plot_pareto(report, path)` draws
  quality (perplexity on the first text source) against speedup (batch-1 decode tokens/s ratio).
- `pareto_front(points)` is the plain definition, unit-tested on hand-made points.
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path

from rich.markup import escape
from rich.table import Table

SPEED_FIGURES = ("batch1_decode_tok_s", "batch1_tok_s", "online_tok_s", "ttft_p50_ms")


def pareto_front(points: list[tuple[float, float]], maximize: tuple[bool, bool] = (True, False)) -> list[int]:
    """Indices of the points no other point dominates, sorted by the first coordinate.

    A point dominates another when it is at least as good in both coordinates and strictly better in
    one; `maximize` says, per coordinate, whether higher is better (default: x higher, y lower, i.e.
    speedup against perplexity). Points with a NaN or None coordinate are never on the front. Equal
    points do not dominate each other, so duplicates are all kept.
    """
    sign = [1 if m else -1 for m in maximize]
    ok = [i for i, p in enumerate(points) if all(v is not None and not math.isnan(v) for v in p)]
    # Compare in "higher is better" space.
    g = {i: (sign[0] * points[i][0], sign[1] * points[i][1]) for i in ok}

    def dominated(i: int) -> bool:
        return any(g[j][0] >= g[i][0] and g[j][1] >= g[i][1] and g[j] != g[i] for j in ok)

    return sorted((i for i in ok if not dominated(i)), key=lambda i: (points[i][0], points[i][1]))


def columns(report: dict) -> list[dict]:
    """The table's figures in order: {"key", "header", "better" ("lower"|"higher"), "digits"}."""
    s = report["settings"]
    cols = [dict(key="params", header="params", better="lower", digits=None),
            dict(key="disk_mb", header="disk MB", better="lower", digits=1),
            dict(key="serving_mb", header="serving MB", better="lower", digits=0),
            dict(key="memory_mb", header="eval peak MB", better="lower", digits=0)]
    first = report["models"][0]["accuracy"]
    for source in first.get("perplexity", {}):
        cols.append(dict(key=f"ppl:{source}", header=f"ppl {source}", better="lower", digits=2))
    for task in first.get("tasks", {}):
        cols.append(dict(key=f"acc:{task}", header=f"acc {task}", better="higher", digits=3))
        cols.append(dict(key=f"acc_norm:{task}", header=f"acc_norm {task}", better="higher", digits=3))
    cols += [dict(key="batch1_decode_tok_s", header="batch-1 decode tok/s", better="higher", digits=1),
             dict(key="batch1_tok_s", header="batch-1 tok/s with prefill", better="higher", digits=1),
             dict(key="online_tok_s", header=f"c={s['concurrency']} tok/s", better="higher", digits=1),
             dict(key="ttft_p50_ms", header=f"TTFT p50 ms (c={s['concurrency']})", better="lower", digits=1)]
    return cols


def _values(model: dict) -> dict:
    """The plain value of each non-speed figure of one model."""
    acc = model["accuracy"]
    values = {"params": model["params"], "disk_mb": _mb(model["disk_bytes"]),
              "serving_mb": _mb(_serving_bytes(model.get("serving_memory", {}))),
              "memory_mb": _mb(model["memory"]["load_eval_bytes"])}
    for source, r in acc.get("perplexity", {}).items():
        values[f"ppl:{source}"] = r["perplexity"]
    for task, r in acc.get("tasks", {}).items():
        values[f"acc:{task}"] = r["acc"]
        values[f"acc_norm:{task}"] = r.get("acc_norm")  # per byte of each choice: HellaSwag-style tasks' usual figure
    return values


def _serving_bytes(memory: dict):
    """On CUDA the weights and KV cache are on the GPU: its allocated bytes; else the process's resident growth."""
    return memory.get("cuda_bytes", memory.get("serving_bytes"))


def _mb(n):
    return None if n is None else n / 2**20


def _ratio(value, base):
    if value is None or base is None or base == 0:
        return None
    return value / base


def add_figures(report: dict) -> dict:
    """Fill `report["columns"]`, each model's `figures`, and `report["pareto"]`; returns `report`."""
    report["columns"] = columns(report)
    base = report["models"][0]
    base_values = _values(base)
    for model in report["models"]:
        figures = {}
        for key, value in _values(model).items():
            figures[key] = {"value": value, "ratio": _ratio(value, base_values.get(key))}
        speed = model["speed"]
        for key in SPEED_FIGURES:
            spread, base_spread = speed["figures"][key], speed["base_figures"][key]
            figures[key] = {"value": spread["median"], "min": spread["min"], "max": spread["max"],
                            "ratio": _ratio(spread["median"], base_spread["median"]),
                            "earlier_run": speed["run"] != report["run"]}
            if figures[key]["earlier_run"] and model is not base:  # the base figure its ratio divided by, then
                figures[key]["base_then"] = base_spread["median"]
            ratios = speed.get("ratios", {}).get(key)
            if ratios and model is not base:  # alternated repetitions: the median of per-repetition ratios
                figures[key].update(ratio=ratios["median"], ratio_min=ratios["min"], ratio_max=ratios["max"])
        model["figures"] = figures
    report["pareto"] = pareto_summary(report)
    report["pareto_memory"] = pareto_summary(report, x="serving_mb")
    return report


def pareto_summary(report: dict, x: str = "batch1_decode_tok_s") -> dict:
    """Which figure is quality and which is speed (or, x="serving_mb", serving memory) on a plot, each model's
    point (x as the ratio to the base), and the front (higher speedup, or lower memory, and better quality)."""
    quality = next((c for c in report["columns"] if c["key"].startswith("ppl:")), None)
    if quality is None:  # no text source: fall back to the first task's accuracy (higher is better)
        quality = next((c for c in report["columns"] if c["key"].startswith("acc:")), None)
    models = report["models"]
    xs = [m["figures"].get(x, {}).get("ratio") for m in models]
    ys = [m["figures"][quality["key"]]["value"] if quality else None for m in models]
    higher_x = next(c["better"] for c in report["columns"] if c["key"] == x) == "higher"
    front = pareto_front(list(zip(xs, ys)), maximize=(higher_x, quality is not None and quality["better"] == "higher"))
    return {"x": f"{x} ratio", "y": quality["key"] if quality else None,
            "y_better": quality["better"] if quality else None,
            "points": {m["label"]: [x, y] for m, x, y in zip(models, xs, ys)},
            "front": [models[i]["label"] for i in front]}


def machine() -> dict:
    """The report's machine section: what the speed figures were measured on."""
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        cpuinfo = ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    info = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _num(value, digits) -> str:
    if value is None:
        return "-"
    if digits is None:  # a count: 135.0M, 48.3K
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.1f}{unit}"
        return str(int(value))
    return f"{value:,.{digits}f}"


def cell(fig: dict, digits) -> str:
    """`6.80 (1.00x)`, or for a speed figure `120.4 [118.0, 125.1] (0.97x)`, with the range of the
    per-repetition ratios where the repetitions alternated: `(0.97x, 0.95-0.99)`; † marks an earlier run."""
    text = _num(fig["value"], digits)
    if "min" in fig:
        text += f" [{_num(fig['min'], digits)}, {_num(fig['max'], digits)}]"
    if fig["ratio"] is None:
        text += " (-)"
    elif "ratio_min" in fig:
        text += f" ({fig['ratio']:.2f}x, {fig['ratio_min']:.2f}-{fig['ratio_max']:.2f})"
    else:
        text += f" ({fig['ratio']:.2f}x)"
    if fig.get("base_then") is not None:  # beside today's base row, the ratio would read wrong without it
        text = text[:-1] + f" of base {_num(fig['base_then'], digits)})"
    return text + (" †" if fig.get("earlier_run") else "")


def _header(col: dict) -> str:
    return f"{col['header']} {'↓' if col['better'] == 'lower' else '↑'}"


def model_name(m: dict) -> str:
    """A model's name in the tables: its label, marked where it is the base and where its speed was measured
    with self-speculative decoding from one of its exits, a draft model or prompt lookup (the notes say how)."""
    sp = m.get("speed", {}).get("speculation")
    return (m["label"] + (" (base)" if m["role"] == "base" else "")
            + ("" if not sp else " (draft+ngram-spec)" if {"draft_model", "prompt_lookup"} <= set(sp)
               else " (draft-spec)" if "draft_model" in sp else " (ngram-spec)" if "prompt_lookup" in sp
               else " (self-spec)"))


def table_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of cells per model, shared by the markdown and the rich table."""
    headers = ["model"] + [_header(c) for c in report["columns"]]
    rows = [[model_name(m)] + [cell(m["figures"][c["key"]], c["digits"]) for c in report["columns"]]
            for m in report["models"]]
    return headers, rows


NORM_WORDS = {"shared": "the model's final norm", "own": "its own norm", "lens": "its own norm and lens"}


def speculation_note(label: str, sp: dict, settings: dict) -> str:
    """One line on how a model's speed was measured with speculative decoding, and what it achieved."""
    achieved = ("no token was drafted" if sp["acceptance_rate"] is None else
                f"{sp['acceptance_rate']:.0%} of {sp['drafted_tokens']} drafted tokens accepted, "
                f"{sp['mean_accepted_length']:.2f} tokens per speculative step")
    plain = (f"; batches of more than {sp['max_batch']} decode plainly"
             if settings["concurrency"] > sp["max_batch"] else "")
    lookup = (f"prompt-lookup speculative decoding (drafts copied from the text where its last {sp['prompt_lookup']} "
              "tokens occurred before)") if "prompt_lookup" in sp else ""
    how = (f"{lookup}, and draft-model speculative decoding from {sp['draft_model']} where nothing matched"
           if lookup and "draft_model" in sp else
           f"draft-model speculative decoding from {sp['draft_model']}" if "draft_model" in sp else
           lookup or f"self-speculative decoding from exit {sp['exit_layer']} ({NORM_WORDS.get(sp['norm'], sp['norm'])})")
    return (f"{label}: speed with {how}, adaptive, at most {sp['num_draft']} drafts: {achieved} "
            f"(warm-ups and all repetitions together){plain}. Lossless: the full model verifies every drafted token, "
            "so greedy output is its own and the perplexity and accuracy are the model's, unchanged.")


def prompts_words(settings: dict) -> str:
    """What the speed prompts were, in words."""
    if settings.get("speed_prompts_file"):
        return f"prompts of {settings['speed_prompts_file']}"
    if settings.get("speed_task"):
        return (f"chat prompts asking to {'repeat' if settings['speed_task'] == 'quote' else 'summarize'} a "
                "held-out paragraph of builtin:wiki")
    return f"{settings['prompt_len']}-token prompts"


def notes(report: dict) -> list[str]:
    """What each figure is and how it was measured, one line each (under both tables)."""
    s = report["settings"]
    windows = ("all" if s["max_windows"] is None else
               f"at most {s['max_windows']}" + ("" if s.get("spread_windows") else " (the first)"))
    lines = [
        "Cells are value (value / base); ↓ lower is better, ↑ higher is better.",
        f"Perplexity: {windows} windows of {s['window']} tokens of the {s['split']} split of {', '.join(s['data'])}"
        + (" (spread evenly over it)" if s.get("spread_windows") else "")
        + ("; accuracy: log-likelihood multiple choice (acc: the choice of highest summed log-likelihood; acc_norm: "
           "per byte of the choice)" if s["tasks"] else "") + f"; in {s['eval_dtype']} on {s['device']}.",
        f"Speed: slimlm's serving engine in {s['dtype']}, the same {prompts_words(s)} for every model, "
        f"{s['gen_len']} new tokens each (greedy, EOS ignored); median [min, max] of {s['reps']} repetition(s) after "
        + (f"a warm-up, in each of {s['speed_rounds']} loads of the models (figures over all "
           f"{s['speed_rounds'] * s['reps']})" if s.get("speed_rounds", 1) > 1 else "a warm-up")
        + ". batch-1 decode tok/s: one request's tokens after its first over the time they took (1 / TPOT), the "
        "speed the Pareto plot uses; batch-1 tok/s with prefill: all its tokens over the wall time from its "
        f"arrival; c={s['concurrency']}: "
        f"{s['num_requests']} requests with {s['concurrency']} in flight. Speed ratios divide by the base measured in "
        "the same run" + ("; where a ratio shows a range, the models' repetitions alternated and the ratio is the "
                          "median of the per-repetition ratios (range: their min-max)."
                          if any("ratio_min" in f for m in report["models"] for f in m["figures"].values()) else "."),
        f"Serving MB: resident memory (RSS) of a fresh process holding the model in slimlm's engine in {s['dtype']} "
        f"(weights as served, packed int4/int8 included; a KV cache for {s['concurrency']} requests of the benchmark's "
        "length; a draft model where one drafts), after serving one full batch, minus its RSS before the load"
        + (" (on CUDA: the GPU memory allocated)." if str(s.get("device", "")).startswith("cuda") else "."),
        "Eval peak MB: peak RSS (VmHWM) of a fresh process while it loaded the model and ran the evaluation, minus "
        "its RSS just before the load (interpreter and libraries); the peak record was reset before the load. "
        f"It is the evaluation's footprint, in {s['eval_dtype']}: a quantized model is evaluated through its dequantized "
        "weights, so it can exceed the base's.",
        "Disk: all files of the model folder (built-in aliases: the converted cached folder, in float32). Params: the loaded "
        "model's parameters, tied weights counted once.",
    ]
    if not all(m["memory"].get("exact", True) and m.get("serving_memory", {}).get("exact", True)
               for m in report["models"]):
        lines.append("Memory: this system could not reset the peak-RSS record or read the RSS, so memory is the "
                     "growth past the peak the imports reached: a lower bound.")
    lines += [speculation_note(m["label"], m["speed"]["speculation"], s) for m in report["models"]
              if m["speed"].get("speculation")]
    if any(f.get("earlier_run") for m in report["models"] for f in m["figures"].values()):
        lines.append("†: speed measured in an earlier run of this comparison (its ratio divides by the base "
                     "measured in that run, whose figure the cell names); it was cached and not measured again.")
    return lines


def markdown(report: dict) -> str:
    """report.md: the command, the table, the notes, the settings, the machine and the plot."""
    headers, rows = table_cells(report)
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731 - a model path may hold a bar
    lines = ["# slimlm compare", "", f"Command: `{report['command']}`  ", f"Created: {report['created']}, "
             f"run `{report['run']}`; base: **{esc(report['models'][0]['label'])}**", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {line}" for line in notes(report)]
    front = ", ".join(report["pareto"]["front"]) or "-"
    lines += ["", f"Pareto front (quality {report['pareto']['y']} against batch-1 decode speedup): {front}"]
    if report.get("pareto_memory", {}).get("front"):
        lines += ["", f"Pareto front (quality against serving memory): {', '.join(report['pareto_memory']['front'])}"]
    lines += ["", "![quality against speedup and serving memory](pareto.png)", ""]
    lines += pipeline_lines(report, esc)
    if report.get("failed"):
        lines += ["## Models that could not be measured", "",
                  "Not in the table or the plot; the next run of this comparison measures what each lacks.", ""]
        lines += [f"- {esc(f['label'])} (`{f['spec']}`), {f['stage']}: {esc(f['error'])}"
                  + (f" (what to do: {esc(f['hint'])})" if f.get("hint") else "") for f in report["failed"]] + [""]
    lines += ["## Models", ""] + [f"- {esc(m['label'])}: `{m['spec']}`" + (f", draft `{m['draft']}`" if m.get("draft") else "")
                                   for m in report["models"]]
    lines += ["", "## Settings", "", "```", *(f"{k}: {v}" for k, v in report["settings"].items()), "```",
              "", "## Machine", "", "```", *(f"{k}: {v}" for k, v in report["machine"].items()), "```", ""]
    return "\n".join(lines)


def pipeline_lines(report: dict, esc) -> list[str]:
    """`slimlm pipeline`'s variants (failed ones with their error; they are not in the table), markdown."""
    variants = report.get("pipeline", {}).get("variants", {})
    if not variants:
        return []
    lines = ["## Variants", "", f"Made by `slimlm pipeline {esc(report['pipeline']['config'])}`; "
             "each variant's command and log are in pipeline.json.", "",
             "| variant | recipe | from | status | seconds | export or error |", "|---|---|---|---|---:|---|"]
    for name, v in variants.items():
        status = v["status"] + (" (earlier run)" if v.get("skipped") else "")
        what = f"`{v['export']}`" if v["status"] == "done" else v.get("error", "")
        lines.append(f"| {esc(name)} | {v['recipe']} | {esc(v.get('from') or 'base')} | {status} | "
                     f"{v.get('seconds', 0):.0f} | {esc(what)} |")
    return lines + [""]


def rich_table(report: dict) -> Table:
    """The same cells for the terminal, turned on their side (a row per figure, a column per model) to fit
    80 columns; each cell shows the value over its ratio."""
    table = Table(title=escape(f"compare: base {report['models'][0]['label']}"))
    table.add_column("figure")
    for m in report["models"]:
        table.add_column(escape(model_name(m)), justify="right")
    for c in report["columns"]:
        cells = [cell(m["figures"][c["key"]], c["digits"]).replace(" (", "\n(", 1) for m in report["models"]]
        table.add_row(escape(_header(c)), *(escape(text) for text in cells))
    return table


# Where a label may sit beside its point: (dx, dy) in points and the text's vertical alignment; right of it
# first, then left, then further up or down.
LABEL_SPOTS = [(6, 3, "bottom"), (6, -3, "top"), (-6, 3, "bottom"), (-6, -3, "top"), (6, 12, "bottom"),
               (6, -12, "top"), (-6, 12, "bottom"), (-6, -12, "top"), (6, 22, "bottom"), (-6, -22, "top")]


def place_labels(ax, points: list[tuple[float, float, str]], marker_px: float = 9.0) -> list:
    """Label each point at the first spot of `LABEL_SPOTS` where its text stays inside the axes and comes no
    nearer than `marker_px` to another point, and overlaps no label placed before it (the first spot when
    none is free); a label set further off gets a thin leader line to its point. Call after the axes'
    limits and layout are final. Returns the text artists."""
    renderer = ax.figure.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    marks = [ax.transData.transform((x, y)) for x, y, _ in points]
    taken, texts = [], []
    for i, (x, y, label) in enumerate(points):
        for n, (dx, dy, va) in enumerate(LABEL_SPOTS + LABEL_SPOTS[:1]):
            spot = dict(textcoords="offset points", xytext=(dx, dy), fontsize=8, ha="left" if dx > 0 else "right", va=va)
            text = ax.annotate(label, (x, y), **spot)
            box = text.get_window_extent(renderer)
            free = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                    and not any(box.overlaps(b) for b in taken)
                    and not any(box.x0 - marker_px < mx < box.x1 + marker_px and box.y0 - marker_px < my < box.y1 + marker_px
                                for j, (mx, my) in enumerate(marks) if j != i))
            if free or n == len(LABEL_SPOTS):  # the last pass is the first spot again: where none was free
                if abs(dy) > 3:  # set off from its point: a leader line says whose label it is
                    text.remove()
                    text = ax.annotate(label, (x, y), **spot, arrowprops=dict(arrowstyle="-", lw=0.5, color="gray",
                                                                               shrinkA=0, shrinkB=4))
                break
            text.remove()
        taken.append(box)
        texts.append(text)
    return texts


def plot_pareto(report: dict, path: str | Path) -> Path:
    """pareto.png: quality against speedup and, beside it, against serving memory; one labelled point per model,
    each front as a step line (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend may be picked up
    import matplotlib.pyplot as plt

    memory = report.get("pareto_memory")
    panels = 2 if memory and any(x is not None for x, _ in memory["points"].values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=120, squeeze=False)
    speed_ax = axes[0][0]
    _plot_front(speed_ax, report["pareto"], "pre")  # at a speedup >= x the best quality is the next point's
    speed_ax.set_xlabel("speedup: batch-1 decode tokens/s ÷ base (higher is better)")
    speed_ax.set_title(f"slimlm compare: quality against speed (base {report['models'][0]['label']})", fontsize=10)
    if panels == 2:
        mem_ax = axes[0][1]
        _plot_front(mem_ax, memory, "post")  # within a memory <= x the best quality is the last point's
        mem_ax.set_xlabel("serving memory ÷ base (lower is better)")
        mem_ax.set_title("quality against serving memory", fontsize=10)
    fig.tight_layout()
    for ax, p in zip(axes[0], (report["pareto"], memory)):
        place_labels(ax, sorted((x, y, label) for label, (x, y) in p["points"].items()
                                if x is not None and y is not None))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_front(ax, p: dict, where: str) -> None:
    """One panel: the points (the front's in red), the front as a step line, the y axis and grid."""
    front = set(p["front"])
    shown = sorted(((x, y, label) for label, (x, y) in p["points"].items() if x is not None and y is not None))
    for x, y, label in shown:
        ax.scatter([x], [y], s=40, zorder=3, color="tab:red" if label in front else "tab:gray")
    ys = [y for _, y, _ in shown]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")  # perplexities spanning decades: a linear axis flattens all the good models
    pts = [p["points"][label] for label in p["front"]]
    if len(pts) > 1:
        ax.step([x for x, _ in pts], [y for _, y in pts], where=where, color="tab:red", lw=1.2, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.axvline(1.0, color="lightgray", lw=0.8, zorder=0)
    ax.margins(0.15)  # room for the labels of the outermost points
    better = "lower" if p["y_better"] == "lower" else "higher"
    ax.set_ylabel(f"{p['y']} ({better} is better)")
    ax.grid(True, alpha=0.3)


def write_report(report: dict, out: Path) -> dict:
    """Add the figures to `report`, then write report.json, report.md and pareto.png into `out`."""
    from slimlm.toolkit.eval import write_json

    add_figures(report)
    write_json(report, out / "report.json")
    (out / "report.md").write_text(markdown(report))
    plot_pareto(report, out / "pareto.png")
    return report


def print_report(report: dict, console) -> None:
    """The table, its notes and where the files are, on a rich console."""
    console.print(rich_table(report))
    for line in notes(report):
        console.print(f"[dim]{escape(line)}[/]", highlight=False)
    for name, v in report.get("pipeline", {}).get("variants", {}).items():
        if v["status"] != "done":
            console.print(f"[red]failed[/] {escape(name)}: {escape(v.get('error', ''))}", highlight=False)
    for f in report.get("failed", []):
        console.print(f"[red]not measured[/] {escape(f['label'])} ({f['stage']}): {escape(f['error'])}", highlight=False)
        if f.get("hint"):
            console.print(f"  {escape(f['hint'])}", highlight=False)
    out = Path(report["out"])
    console.print(escape(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'pareto.png'}"), highlight=False)
