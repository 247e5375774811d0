"""How far to shrink each axis to reach a parameter budget, counted exactly.

The rule: the chosen axes share one keep-ratio `r`. An axis `a` with weight `w_a` (default 1; written
`width:0.5` in an axes list) keeps `1 - w_a * (1 - r)` of its original size, so weight-1 axes keep `r`,
an axis of weight 0.5 loses half as large a fraction, one of weight 2 twice as large. Sizes are rounded

- `mlp` and `width`: to a multiple of `multiple` (default 64), at least one multiple. Why 64: the serving
  engine's bf16 CPU GEMV (and its fused decode stack) needs out_features % 64 and in_features % 32, and
  hidden and MLP sizes are both (gate/up/down, o_proj, the LM head); 432 or 1168 fall back to oneDNN's
  slower path. An axis too small to hold 4 multiples (tiny models) halves the multiple until it does.
- `heads`: the kept query heads are `g` KV groups times `p` heads per group, the same `p` in every group
  (`structure.head_layouts`; for one count, whole groups first), at least one head. Where transformers
  requires `hidden_size % num_attention_heads == 0` (Llama; `structure.hidden_needs_heads_divisor`),
  heads and width are rounded together: for each head count `n` the width is rounded to a multiple of
  lcm(multiple, n), and the pair nearest to both targets (sum of squared log ratios) wins. SmolLM2 at
  r = 0.77: 6 heads with width 384 (lcm 192) rather than 4 heads with 448 or 9 with 576. Otherwise the
  count nearest to the target wins. If heads do not shrink, widths are multiples of lcm(m, heads), `m` the
  largest power-of-two fraction of `multiple` that leaves 4 of them (SmolLM2's 9 heads: 144, which the
  fast kernels cannot take; prune heads too to keep multiples of 64).
- `depth`: to whole layers, at least one.

Rounding makes the count a step function of `r` that is not quite monotone (a head count's coarser width
multiple can win over a finer one), so the planner scans `r` on a fine grid and refines the best point by
bisection: the result is the largest `r` found whose exact count (see `structure.count_params`) is at or
below the target. Axes not chosen keep their size.

Why weights: axes differ in how much accuracy a removed parameter costs. On SmolLM2-135M (activation
scores, 8 held-out wiki windows, no retraining) removing ~28M parameters by MLP channels or by layers
raised perplexity from 17 to ~63, by hidden width to 230, and removing 18M by heads to 248; so a budget
is best met mostly from the cheap axes, with the expensive ones shrinking less.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import SlimlmError
from .structure import Shape, count_params, head_layouts, hidden_needs_heads_divisor, shape_of

AXES = ("heads", "mlp", "width", "depth")
MULTIPLE = 64  # default rounding of MLP and hidden sizes: what the serving engine's fast CPU GEMV needs
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
_TARGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMBG%]?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """The chosen shape and its exact size."""

    shape: Shape
    params: int          # exact parameter count of the pruned model (tied weights once)
    params_before: int
    target: int
    ratio: float         # the shared keep-ratio r (what weight-1 axes keep)
    axes: dict           # axis -> weight


def parse_axes(axes) -> dict[str, float]:
    """"heads,mlp,width:0.5" (or a list, or a dict) -> {"heads": 1.0, "mlp": 1.0, "width": 0.5}.

    SlimlmError for an unknown axis, a weight that is not a positive number, or an empty list.
    """
    if isinstance(axes, dict):
        items = [(str(k), v) for k, v in axes.items()]
    else:
        parts = axes.split(",") if isinstance(axes, str) else list(axes)
        items = [tuple(p.split(":", 1)) if ":" in p else (p, 1.0) for p in map(str, parts) if p.strip()]
    out: dict[str, float] = {}
    for name, weight in items:
        name = name.strip().lower()
        if name not in AXES:
            raise SlimlmError(f"unknown pruning axis {name!r}.",
                              f"Choose one or more of: {', '.join(AXES)} (comma-separated, optionally axis:weight).")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = float("nan")
        if not w > 0 or math.isinf(w):
            raise SlimlmError(f"the weight of axis {name!r} must be a positive number, got {weight!r}.",
                              "Write e.g. width:0.5 (width shrinks half as fast as the others).")
        out.setdefault(name, w)
    if not out:
        raise SlimlmError("no pruning axis given.", f"Choose one or more of: {', '.join(AXES)} (comma-separated).")
    return out


def parse_target(spec, total: int) -> int:
    """A parameter budget: "70M", "1.5B", "500K", "123456", or a fraction of `total` ("0.5", "50%").

    A plain number below 1 is a fraction; a plain whole number of 1 or more is a count (1.5 is neither).
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = repr(spec)
    m = _TARGET.match(str(spec))
    if not m:
        raise SlimlmError(f"cannot read the parameter target {spec!r}.",
                          "Write a count (70M, 1.5B, 500K, 70000000) or a fraction (0.5 or 50%).")
    value, suffix = float(m.group(1)), m.group(2).upper()
    if suffix == "%":
        value = value / 100 * total
    elif suffix == "" and value < 1:
        value = value * total
    elif suffix == "" and value != int(value):
        raise SlimlmError(f"the parameter target {spec!r} is neither a fraction (below 1) nor a whole count.",
                          "Write a fraction as 0.5 or 50%, a count as 70000000 or 70M.")
    else:
        value *= _SUFFIX[suffix]
    if value <= 0:
        raise SlimlmError(f"the parameter target {spec!r} is not positive.")
    return int(value)


def shape_at(model, ratio: float, axes, multiple: int = MULTIPLE) -> Shape:
    """The shape the rule gives for shared keep-ratio `ratio` on `axes` (see the module doc)."""
    return _rule(model, axes, multiple)(ratio)


def multiples(model, axes, multiple: int = MULTIPLE) -> dict[str, int]:
    """The multiple each of the MLP and hidden sizes is rounded to, after the fallbacks of the module doc."""
    check_multiple(multiple)
    axes = parse_axes(axes)
    cur = shape_of(model)
    hidden = fit_multiple(multiple, cur.hidden_size)
    if "heads" not in axes and hidden_needs_heads_divisor(model.config):
        # Every width must be a multiple of the (kept) head count too: halve until 4 such widths fit.
        n = cur.num_attention_heads
        while hidden > 1 and cur.hidden_size < 4 * math.lcm(hidden, n):
            hidden //= 2
        hidden = math.lcm(hidden, n)
    return {"mlp": fit_multiple(multiple, cur.intermediate_size), "hidden": hidden}


def fit_multiple(multiple: int, full: int) -> int:
    """`multiple`, halved until `full` holds at least 4 of it (never below 1): tiny models keep some resolution."""
    m = multiple
    while m > 1 and full < 4 * m:
        m //= 2
    return max(m, 1)


def check_multiple(multiple) -> None:
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise SlimlmError(f"the size multiple must be a positive integer, got {multiple!r}.",
                          f"MLP and hidden sizes are rounded to it; {MULTIPLE} (the default) suits the serving "
                          "engine's fast CPU kernels, which need hidden and MLP sizes divisible by 64.")


def _rule(model, axes, multiple: int):
    """`ratio -> Shape` for one model and axes: the sizes and multiples are worked out once."""
    axes = parse_axes(axes)
    cur = shape_of(model)
    step = multiples(model, axes, multiple)
    coupled = hidden_needs_heads_divisor(model.config)
    layouts = head_layouts(cur.num_attention_heads, cur.num_key_value_heads)

    def keep(axis, ratio):
        return 1 - axes[axis] * (1 - ratio) if axis in axes else 1.0

    def at(ratio: float) -> Shape:
        width = keep("width", ratio)
        hidden = _scale(cur.hidden_size, width, step["hidden"])
        heads, groups = cur.num_attention_heads, cur.num_key_value_heads
        if keep("heads", ratio) < 1:
            # Nearest (heads, width) pair in log distance, each where it may lie (see the module doc).
            want_h = max(keep("heads", ratio) * cur.num_attention_heads, 0.5)
            want_w = max(width * cur.hidden_size, 0.5)
            best = None
            for n, g, _ in layouts:
                w = _scale(cur.hidden_size, width, math.lcm(step["hidden"], n)) if coupled else hidden
                if coupled and w % n:
                    continue
                miss = math.log(n / want_h) ** 2 + math.log(w / want_w) ** 2
                if best is None or miss < best[0] - 1e-12:
                    best = (miss, n, g, w)
            _, heads, groups, hidden = best  # one head always fits
        return Shape(num_hidden_layers=_scale(cur.num_hidden_layers, keep("depth", ratio), 1),
                     num_attention_heads=heads, num_key_value_heads=groups,
                     intermediate_size=_scale(cur.intermediate_size, keep("mlp", ratio), step["mlp"]),
                     hidden_size=hidden)

    return at


def _scale(full: int, keep: float, multiple: int) -> int:
    if keep >= 1:
        return full
    return min(full, max(multiple, math.floor(keep * full / multiple + 0.5) * multiple))  # round half up


def plan(model, target, axes=AXES, multiple: int = MULTIPLE, grid: int = 1024, steps: int = 40) -> Plan:
    """The largest shape on `axes` (shared keep-ratio, optional weights) with at most `target` parameters.

    `target` is anything `parse_target` reads. SlimlmError if it is above the model's size, below the
    smallest model the chosen axes can reach, or if `multiple` leaves width no smaller size to take.
    """
    axes = parse_axes(axes)
    check_multiple(multiple)
    before = count_params(model)
    goal = parse_target(target, before)
    if goal > before:
        raise SlimlmError(f"the target of {goal:,} parameters is larger than the model ({before:,}).",
                          "Pruning only removes parameters: choose a smaller target.")
    cur = shape_of(model)
    step = multiples(model, axes, multiple)
    if "width" in axes and step["hidden"] >= cur.hidden_size:  # a model with about as many heads as channels
        raise SlimlmError(
            f"hidden width cannot shrink: transformers requires hidden_size to be a multiple of "
            f"num_attention_heads ({cur.num_attention_heads}, kept since heads are not pruned), and the model's "
            f"width is {cur.hidden_size}.", "Add the heads axis, so that heads can shrink with the width.")
    rule = _rule(model, axes, multiple)
    size = lambda r: count_params(model, rule(r))  # noqa: E731
    floor = 1 - 1 / min(axes.values())  # at this ratio every chosen axis is at its minimum
    smallest = size(floor)
    if smallest > goal:
        missing = [a for a in AXES if a not in axes]
        raise SlimlmError(
            f"the target of {goal:,} parameters cannot be reached by pruning {', '.join(axes)}: the smallest "
            f"such model still has {smallest:,}.",
            f"Add axes ({', '.join(missing)})." if missing else "Choose a larger target.")
    if size(1.0) <= goal:
        lo = 1.0
    else:
        # The count is a step function of r, monotone but for a few rounding dips: take the largest grid
        # point that fits, then bisect towards the next one (count(lo) <= goal is kept invariant).
        points = [floor + (1.0 - floor) * i / grid for i in range(grid + 1)]
        i = max(k for k, r in enumerate(points) if size(r) <= goal)
        lo, hi = points[i], points[i + 1]
        for _ in range(steps):
            mid = (lo + hi) / 2
            if size(mid) <= goal:
                lo = mid
            else:
                hi = mid
    shape = rule(lo)
    return Plan(shape, count_params(model, shape), before, goal, lo, axes)
