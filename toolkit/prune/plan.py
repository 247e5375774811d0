"""How far to shrink each axis to reach a parameter budget, counted exactly.

The rule: the chosen axes share one keep-ratio `r`. An axis `a` with weight `w_a` (default 1; written
`width:0.5` in an axes list) keeps `1 - w_a * (1 - r)` of its original size, so weight-1 axes keep `r`,
an axis of weight 0.5 loses half as large a fraction, one of weight 2 twice as large. Sizes are rounded

- `heads`: to whole KV groups (a KV head with all its query heads), at least one;
- `mlp` and `width`: to a multiple of `multiple` (default 16: tensor-core and SIMD friendly; a model
  too small for that multiple uses 1), at least one multiple;
- `depth`: to whole layers, at least one.

Every size grows with `r` and the parameter count grows with every size, so the count is a monotone step
function of `r`; bisection finds the largest `r` whose exact count (see `structure.count_params`) is at
or below the target. Axes not chosen keep their size.

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
from .structure import Shape, count_params, shape_of

AXES = ("heads", "mlp", "width", "depth")
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

    A plain number below 1 is a fraction; a plain number of 1 or more is a count.
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
    else:
        value *= _SUFFIX[suffix]
    if value <= 0:
        raise SlimlmError(f"the parameter target {spec!r} is not positive.")
    return int(value)


def shape_at(model, ratio: float, axes, multiple: int = 16) -> Shape:
    """The shape the rule gives for shared keep-ratio `ratio` on `axes` (see the module doc)."""
    axes = parse_axes(axes)
    cur = shape_of(model)
    per_group = cur.num_attention_heads // cur.num_key_value_heads

    def size(axis, full, step):
        return full if axis not in axes else _scale(full, 1 - axes[axis] * (1 - ratio), step)

    groups = size("heads", cur.num_key_value_heads, 1)
    return Shape(num_hidden_layers=size("depth", cur.num_hidden_layers, 1),
                 num_attention_heads=groups * per_group, num_key_value_heads=groups,
                 intermediate_size=size("mlp", cur.intermediate_size, multiple),
                 hidden_size=size("width", cur.hidden_size, multiple))


def _scale(full: int, keep: float, multiple: int) -> int:
    if keep >= 1:
        return full
    m = multiple if full >= 2 * multiple else 1
    return min(full, max(m, math.floor(keep * full / m + 0.5) * m))  # round half up, not to even


def plan(model, target, axes=AXES, multiple: int = 16, steps: int = 60) -> Plan:
    """The largest shape on `axes` (shared keep-ratio, optional weights) with at most `target` parameters.

    `target` is anything `parse_target` reads. SlimlmError if it is above the model's size, or below the
    smallest model the chosen axes can reach.
    """
    axes = parse_axes(axes)
    if not isinstance(multiple, int) or multiple < 1:
        raise SlimlmError(f"the size multiple must be a positive integer, got {multiple!r}.")
    before = count_params(model)
    goal = parse_target(target, before)
    if goal > before:
        raise SlimlmError(f"the target of {goal:,} parameters is larger than the model ({before:,}).",
                          "Pruning only removes parameters: choose a smaller target.")
    floor = 1 - 1 / min(axes.values())  # at this ratio every chosen axis is at its minimum
    smallest = count_params(model, shape_at(model, floor, axes, multiple))
    if smallest > goal:
        missing = [a for a in AXES if a not in axes]
        raise SlimlmError(
            f"the target of {goal:,} parameters cannot be reached by pruning {', '.join(axes)}: the smallest "
            f"such model still has {smallest:,}.",
            f"Add axes ({', '.join(missing)})." if missing else "Choose a larger target.")
    lo, hi = floor, 1.0  # count(lo) <= goal is kept invariant
    if count_params(model, shape_at(model, 1.0, axes, multiple)) <= goal:
        lo = 1.0
    else:
        for _ in range(steps):
            mid = (lo + hi) / 2
            if count_params(model, shape_at(model, mid, axes, multiple)) <= goal:
                lo = mid
            else:
                hi = mid
    shape = shape_at(model, lo, axes, multiple)
    return Plan(shape, count_params(model, shape), before, goal, lo, axes)
