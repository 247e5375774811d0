"""Structured pruning: importance scores, a parameter-budget plan, and removal with uniform shapes.

The steps, each usable alone:
- `compute_importance(model, samples, method)`: activation (Minitron) or first-order Taylor scores per
  head, KV group, MLP channel and hidden channel; block importance per layer. See `importance.py`.
- `plan(model, target, axes)`: the shape with at most `target` parameters on the chosen axes
  (heads, mlp, width, depth), counted exactly, with MLP and hidden sizes in multiples of 64 (the serving
  engine's fast kernels). See `plan.py`.
- `select(model, importance, shape)` -> `Keep`: which layers, KV groups, query heads (the same number
  in every kept group) and channels survive.
- `shrink(model, keep, norm_scale)`: the smaller model, a plain HF model with a plain HF config;
  `norm_scales(importance, keep.hidden)` keeps RMSNorm outputs at size after width pruning.
- `prune_model(...)`: all four in one call.
"""
from .apply import prune_model
from .importance import Importance, compute_importance, norm_scales
from .plan import AXES, MULTIPLE, Plan, multiples, parse_axes, parse_target, plan, shape_at
from .select import Keep, check_shape, select
from .shrink import shrink
from .structure import Shape, count_params, shape_of

__all__ = ["AXES", "MULTIPLE", "Importance", "Keep", "Plan", "Shape", "check_shape", "compute_importance",
           "count_params", "multiples", "norm_scales", "parse_axes", "parse_target", "plan", "prune_model", "select",
           "shape_at", "shape_of", "shrink"]
