"""`slimlm prune`: one-shot structured pruning to a parameter budget, with held-out perplexity before and after.

    slimlm prune smollm2-135m --target-params 70M --axes heads,mlp,width,depth --out out/smollm2-70m
    python recipes/prune.py --config configs/prune/smollm2-135m.yaml --out out/smollm2-70m

Steps: load the model; measure perplexity on held-out text (validation split of built-in corpora);
score heads, KV groups, MLP and hidden channels and layers on calibration windows from the train split;
plan the largest uniform shape under the budget (`toolkit.prune.plan`); remove what scores lowest;
measure perplexity again; write a slimlm export whose manifest records the shapes under `pruned_shapes`.
No training happens here: the pruned model is the starting point for distillation (`recipes/distill.py`).

Settings come from, in rising priority: the defaults below, a YAML `--config` file (its keys are the
option names, `target-params` or `target_params`), and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from slimlm.toolkit.errors import SlimlmError


@dataclass
class PruneConfig:
    """Every setting of one pruning run (the YAML file and the flags fill it; see `add_prune` for meanings)."""

    model: str | None = None
    out: str | None = None
    target_params: str | None = None
    shape: str | None = None
    axes: str = "heads,mlp,width,depth"
    score: str = "activation"
    multiple: int = 64
    norm_correction: bool = True
    data: str = "builtin:wiki"
    calib_samples: int = 32
    calib_len: int = 512
    seed: int = 0
    eval_data: str = "builtin:wiki"
    eval_windows: int = 8
    window: int = 512
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    overwrite: bool = False


FIELDS = [f.name for f in dataclasses.fields(PruneConfig)]


def _add_arguments(p) -> None:
    # Every default is None, so a flag the user did not give does not override the --config file.
    d = PruneConfig()
    p.add_argument("model", nargs="?",
                   help="built-in alias (smollm2-135m), model folder, slimlm export, .gguf or hub id")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of these options; flags override it")
    p.add_argument("--out", help="output folder for the pruned export (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    p.add_argument("--target-params", help="parameter budget: 70M, 1.5B, 500K, a count, or a fraction (0.5, 50%%)")
    p.add_argument("--shape", help="explicit shape instead of a budget, e.g. layers=24,heads=6,kv=3,mlp=1024,"
                   "hidden=512 (the same number of query heads in every kept KV group; without kv, whole groups "
                   "where heads allow)")
    p.add_argument("--axes", help="what may shrink: heads,mlp,width,depth, comma-separated, each optionally "
                   f"axis:weight (width:0.5 shrinks half as fast as the rest; default {d.axes})")
    p.add_argument("--score", choices=["activation", "taylor"], help=f"importance score (default {d.score})")
    p.add_argument("--multiple", type=int, help="round MLP and hidden sizes to this multiple (default "
                   f"{d.multiple}: the serving engine's fast CPU kernels need multiples of 64)")
    p.add_argument("--norm-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="rescale RMSNorm weights so their outputs keep their size after width pruning (default on)")
    p.add_argument("--data", help=f"calibration text; built-in corpora use their train split (default {d.data})")
    p.add_argument("--calib-samples", "--samples", dest="calib_samples", type=int,
                   help=f"calibration windows (default {d.calib_samples})")
    p.add_argument("--calib-len", "--seq-len", dest="calib_len", type=int,
                   help=f"tokens per calibration window (default {d.calib_len})")
    p.add_argument("--seed", type=int, help=f"seed of the calibration windows (default {d.seed})")
    p.add_argument("--eval-data",
                   help=f"held-out text; built-in corpora use their validation split (default {d.eval_data})")
    p.add_argument("--eval-windows", type=int,
                   help=f"perplexity windows before and after; 0 skips (default {d.eval_windows})")
    p.add_argument("--window", type=int, help=f"tokens per perplexity window (default {d.window})")
    p.add_argument("--batch-size", type=int, help=f"windows per forward pass (default {d.batch_size})")
    p.add_argument("--dtype", help=f"float32, bf16 or fp16 (default {d.dtype})")
    p.add_argument("--device", help=f"cpu or cuda (default {d.device})")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")


def add_prune(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning (heads, MLP, width, depth) to a parameter budget",
                       description="Scores structures on calibration text, removes the least important ones "
                       "keeping every layer the same shape, reports held-out perplexity before and after, and "
                       "writes a plain HF export.")
    _add_arguments(p)


def load_config(args) -> PruneConfig:
    """Defaults, then the YAML file, then the flags given on the command line; types checked."""
    from slimlm.recipes.config import from_dict, read_yaml

    values: dict = {}
    where = "prune settings"
    if getattr(args, "config", None):
        values.update({str(k).replace("-", "_"): v for k, v in read_yaml(args.config).items()})
        if isinstance(values.get("axes"), list):
            values["axes"] = ",".join(map(str, values["axes"]))
        where = str(args.config)
    flags = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    for budget, other in (("target_params", "shape"), ("shape", "target_params")):
        if budget in flags and other not in flags:
            values.pop(other, None)  # a budget flag overrides the file's budget of either kind
    values.update(flags)
    cfg = from_dict(PruneConfig, values, where=where)
    if cfg.model and "=" in cfg.model and not Path(cfg.model).exists():
        key, _, value = cfg.model.partition("=")
        raise SlimlmError(f"{cfg.model!r} is not a model: prune takes flags, not key=value overrides.",
                          f"Write --{key.replace('_', '-')} {value} (the YAML's keys are the flags' names).")
    if not cfg.model:
        raise SlimlmError("no model to prune.", "Name one on the command line or as `model:` in the --config file.")
    if not cfg.out:
        raise SlimlmError("no output folder.", "Pass --out DIR (or `out:` in the --config file).")
    if (cfg.target_params is None) == (cfg.shape is None):
        raise SlimlmError("give exactly one of --target-params and --shape.",
                          "For example --target-params 70M, or --shape layers=24,mlp=1024.")
    for name in ("multiple", "calib_samples", "calib_len", "window", "batch_size"):
        if getattr(cfg, name) < 1:
            raise SlimlmError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)!r}.")
    if cfg.eval_windows < 0:
        raise SlimlmError(f"eval-windows must be 0 or more, got {cfg.eval_windows!r}.")
    if cfg.calib_len < 2:  # (it failed after the model load, naming an internal function)
        raise SlimlmError(f"calib-len must be at least 2 (each position's score needs a next token), got {cfg.calib_len}.")
    if cfg.threads is not None and cfg.threads < 1:
        raise SlimlmError(f"threads must be at least 1, got {cfg.threads!r}.")
    return cfg


def check_config(args, data: bool = True):
    """`(settings, axes)`: the settings `load_config` gives, with their dtype, axes and budget read, and with `data`
    their data sources checked (SlimlmError)."""
    from slimlm.recipes.training import check_data
    from slimlm.toolkit.models import parse_dtype
    from slimlm.toolkit.prune import parse_axes, parse_target

    cfg = load_config(args)
    parse_dtype(cfg.dtype)
    axes = parse_axes(cfg.axes)
    if cfg.target_params is not None:
        parse_target(cfg.target_params, 1)
    if data:
        check_data(cfg)
    return cfg, axes


SHAPE_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv": "num_key_value_heads",
              "mlp": "intermediate_size", "hidden": "hidden_size"}


def parse_shape(spec: str, model):
    """`layers=24,heads=6,kv=3,mlp=1024,hidden=512` (any subset) -> a Shape.

    Without `kv`, heads that make whole KV groups keep whole groups (6 of SmolLM2's 9 heads: 2 groups of 3),
    other counts the most groups that hold them evenly (4: 2 groups of 2); `check_shape` refuses the rest.
    """
    from slimlm.toolkit.prune import Shape, shape_of
    from slimlm.toolkit.prune.structure import head_layouts

    cur = shape_of(model).to_dict()
    n_heads, n_kv = cur["num_attention_heads"], cur["num_key_value_heads"]
    given = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in SHAPE_KEYS or not value.strip().isdigit():
            raise SlimlmError(f"cannot read {item!r} in --shape {spec!r}.",
                              f"Write key=integer pairs with keys among {', '.join(SHAPE_KEYS)}.")
        given[SHAPE_KEYS[key.strip()]] = int(value)
    cur.update(given)
    if "num_key_value_heads" not in given:
        heads, per_group = cur["num_attention_heads"], n_heads // n_kv
        fits = [g for h, g, _ in head_layouts(n_heads, n_kv) if h == heads]
        cur["num_key_value_heads"] = (heads // per_group if heads % per_group == 0 or not fits else max(fits))
    return Shape(**cur)


def _perplexity(model, tokenizer, stream, cfg):
    from slimlm.toolkit.eval import perplexity

    if cfg.eval_windows == 0:
        return None
    return perplexity(model, stream, window=cfg.window, batch_size=cfg.batch_size, max_windows=cfg.eval_windows,
                      tokenizer=tokenizer)


def run_prune(args) -> int:
    from rich.console import Console
    import torch
    from rich.markup import escape
    from rich.table import Table

    from slimlm.toolkit.data import calibration_samples, load_texts, token_stream
    from slimlm.toolkit.export import check_target, write
    from slimlm.toolkit.models import load, refuse_quantized
    from slimlm.toolkit.prune import prune_model

    from slimlm.recipes.training import check_context

    cfg, axes = check_config(args)  # typos refused before the (slow) model load
    refuse_quantized(cfg.model, "prune")
    check_context(cfg, cfg.model, ("calib_len", *(["window"] if cfg.eval_windows else [])), flags=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    check_target(out, cfg.overwrite)

    console = Console(stderr=True)
    model, tokenizer = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    shape = parse_shape(cfg.shape, model) if cfg.shape is not None else None
    held_out = token_stream(load_texts(cfg.eval_data, split="validation", tokenizer=tokenizer), tokenizer)
    before = _perplexity(model, tokenizer, held_out, cfg)
    calib = calibration_samples(load_texts(cfg.data, split="train", tokenizer=tokenizer), tokenizer,
                                n=cfg.calib_samples, length=cfg.calib_len, seed=cfg.seed)
    start = time.perf_counter()
    with console.status("scoring and pruning"):
        small, report = prune_model(model, calib, target=cfg.target_params, shape=shape, axes=axes,
                                    score=cfg.score, multiple=cfg.multiple, batch_size=cfg.batch_size,
                                    norm_correction=cfg.norm_correction)
    report["seconds"] = round(time.perf_counter() - start, 2)
    del model
    after = _perplexity(small, tokenizer, held_out, cfg)

    table = Table(title=escape(f"prune: {cfg.model} ({cfg.score} scores, {report['seconds']:.0f} s)"))
    for col in ("", "before", "after"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}")
    for key, name in [("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
                      ("num_key_value_heads", "KV heads"), ("intermediate_size", "MLP"), ("hidden_size", "hidden")]:
        table.add_row(name, str(report["shape_before"][key]), str(report["shape_after"][key]))
    if before is not None:
        table.add_row(f"perplexity ({cfg.eval_windows} x {cfg.window} tokens)", f"{before['perplexity']:.3f}",
                      f"{after['perplexity']:.3f}")
    Console().print(table)
    shape_after = report["shape_after"]
    off = [f"{name} {shape_after[key]}" for key, name in [("intermediate_size", "MLP"), ("hidden_size", "hidden")]
           if shape_after[key] != report["shape_before"][key] and shape_after[key] % 64
           and report["shape_before"][key] >= 256]  # smaller models round to smaller multiples on purpose
    if off:
        console.print(f"note: {' and '.join(off)} not a multiple of 64: the serving engine's fast bf16 CPU GEMV "
                      "needs multiples of 64 (--multiple 64, and the heads axis so that heads can divide the width).")
    heads, width = shape_after["num_attention_heads"], shape_after["hidden_size"]
    was = report["shape_before"]["num_attention_heads"] * report["head_dim"] == report["shape_before"]["hidden_size"]
    if was and heads * report["head_dim"] != width:  # (a base without that equality loads in those engines as it can)
        console.print(f"note: {heads} heads x head_dim {report['head_dim']} != hidden_size {width}: config.json "
                      "says head_dim, which transformers and vLLM's Llama read; engines that take the head size as "
                      "hidden_size / heads (TGI, some vLLM and SGLang model files) cannot load this model. Prune "
                      "heads and width together (--axes) to keep them equal.")
    goal, got = report["target_params"], report["params_after"]
    if goal and got < 0.9 * goal:  # every axis keeps one shared share: the next larger shape can be far above
        console.print(f"note: the pruned model has {got:,} parameters, {got / goal:.0%} of the target {goal:,}: every "
                      f"axis of --axes keeps one shared share (scaled by its weight), and the next larger shape that rule gives is over the "
                      "target (a layer, or heads and the width they divide, step far at a time). For a shape nearer "
                      "the target pick it with --shape, or prune fewer axes or weight them (--axes mlp,depth:0.5).")

    evals = {} if before is None else {"perplexity_before": before, "perplexity_after": after,
                                       "source": cfg.eval_data, "split": "validation"}
    path = write(small, tokenizer, out, overwrite=cfg.overwrite,
                 meta={"base_model": cfg.model, "command": getattr(args, "command_line", "") or shlex.join(sys.argv),
                       "config": dataclasses.asdict(cfg), "eval": evals, "transforms": {"pruned_shapes": report}})
    console.print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python recipes/prune.py ...`: the same options as `slimlm prune`."""
    from slimlm.recipes.cli import run_script

    return run_script("prune", argv)


if __name__ == "__main__":
    sys.exit(main())
