"""One call from a model and calibration tokens to its pruned copy: score, plan, select, shrink."""
from __future__ import annotations

from ..errors import SlimlmError
from .importance import compute_importance, norm_scales
from .plan import AXES, MULTIPLE, multiples, plan
from .select import check_shape, select
from .shrink import shrink
from .structure import Shape, count_params, head_dim, shape_of


def prune_model(model, samples, target=None, shape: Shape | None = None, axes=AXES, score: str = "activation",
                multiple: int = MULTIPLE, batch_size: int = 8, norm_correction: bool = True, progress: bool = False):
    """Prune `model` to `target` parameters (see `plan.parse_target`) or to an explicit `shape`.

    Importance is measured once, on the original model, on calibration windows `samples` [N, T]; the
    original model is left unchanged. `norm_correction` rescales the hidden RMSNorm weights so their
    outputs keep their size when hidden channels go (see `importance.norm_scales`).
    Returns `(pruned_model, report)`; `report` is JSON-ready and is what an export records under its
    `pruned_shapes` transform.
    """
    if (target is None) == (shape is None):
        raise SlimlmError("give either a parameter target or an explicit shape to prune to, not both or neither.")
    before = shape_of(model)
    if shape is not None:
        check_shape(model, shape)
        chosen, ratio, goal, used_axes = shape, None, None, None
    else:
        p = plan(model, target, axes, multiple)
        chosen, ratio, goal, used_axes = p.shape, p.ratio, p.target, p.axes
    importance = compute_importance(model, samples, method=score, batch_size=batch_size, progress=progress)
    keep = select(model, importance, chosen)
    scales = norm_scales(importance, keep.hidden) if norm_correction and len(keep.hidden) < before.hidden_size else None
    small = shrink(model, keep, scales)
    report = {
        "params_before": count_params(model), "params_after": count_params(small), "target_params": goal,
        "shape_before": before.to_dict(), "shape_after": chosen.to_dict(), "head_dim": head_dim(model.config),
        "axes": used_axes, "keep_ratio": ratio, "score": score, "multiple": multiple,
        "multiples": None if shape is not None else multiples(model, used_axes, multiple),
        "norm_correction": scales is not None,
        "calibration": {"samples": int(samples.shape[0]), "tokens_per_sample": int(samples.shape[1])},
        "kept_layers": keep.layers,
    }
    return small, report
