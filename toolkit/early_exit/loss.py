"""The early-exit loss and the curricula that choose which exits train at each step.

Loss of one step, over the exits a curriculum makes active (A), with weights w_E:

    loss = (w_final * CE_final + sum_{E in A} w_E * (CE_E + kd_weight * KD_E)) / (w_final + sum_{E in A} w_E)

CE is next-token cross-entropy over the tokens with a label; KD_E is `kd_loss` (forward KL at
`temperature`, times T**2) of exit E against the final layer's logits, detached, so the exits learn
from the full model without pulling it towards them. Dividing by the active weights keeps the scale
of the loss (and of the learning rate) the same whichever exits are active.
Default weights grow with depth, w_E = E / L (LayerSkip's choice: shallow exits are harder and
should not dominate the shared layers).

Curricula (`active_exits`), for exits E_0 < E_1 < ... < E_{n-1}:
- `all`:        every exit at every step.
- `rotational`: exit i is active when i % R == step % R (R = `rotation`, default n: one exit per step,
                rotating), so each step pays for only n/R exit heads.
- `gradual`:    exits are switched on from the last to the first: exit i from step
                floor(max_steps * (n-1-i) / n) on; the deepest trains from step 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distill import distill_objective
from ..errors import SlimlmError

CURRICULA = ("all", "rotational", "gradual")


def check_curriculum(curriculum: str, rotation: int | None = None) -> None:
    if curriculum not in CURRICULA:
        raise SlimlmError(f"unknown curriculum {curriculum!r}.", f"Expected one of: {', '.join(CURRICULA)}.")
    if rotation is not None and rotation < 1:
        raise SlimlmError(f"rotation must be at least 1, got {rotation}.")


def active_exits(layers: Sequence[int], step: int, max_steps: int, curriculum: str = "all",
                 rotation: int | None = None) -> list[int]:
    """The exits (a sub-list of sorted `layers`) that train at optimizer step `step` (0-based)."""
    check_curriculum(curriculum, rotation)
    layers = sorted(layers)
    n = len(layers)
    if curriculum == "all":
        return layers
    if curriculum == "rotational":
        r = min(rotation or n, n)
        return [e for i, e in enumerate(layers) if i % r == step % r]
    return [e for i, e in enumerate(layers) if step >= (max_steps * (n - 1 - i)) // n]


def default_weights(layers: Sequence[int], num_layers: int) -> dict[int, float]:
    """w_E = E / L: deeper exits weigh more."""
    return {e: e / num_layers for e in layers}


def early_exit_loss(final_logits: torch.Tensor, exit_logits: dict[int, torch.Tensor], labels: torch.Tensor,
                    weights: dict[int, float], final_weight: float = 1.0, kd_weight: float = 0.0,
                    temperature: float = 1.0, chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted early-exit loss (module doc) and its parts as floats.

    Args:
        final_logits: [B, T, V] of the last layer. exit_logits: {E: [B, T, V]} of the active exits.
        labels: [B, T] in HF's convention (logits[:, t] predicts labels[:, t + 1]; -100: no loss).
        weights: w_E for every exit in `exit_logits`.
    Returns:
        (loss, parts): parts has "loss", "ce_final" and per exit "ce_E" (and "kd_E" when kd_weight > 0).
    """
    if final_weight < 0 or kd_weight < 0 or any(weights.get(e, -1) < 0 for e in exit_logits):
        raise SlimlmError("early-exit loss weights must be >= 0, with a weight for every active exit.")
    total_w = final_weight + sum(weights[e] for e in exit_logits)
    if total_w <= 0:
        raise SlimlmError("the early-exit loss has no positive weight (final_weight and every active exit weigh 0).")
    total, parts = final_logits.new_zeros((), dtype=torch.float32), {}
    ce, p = distill_objective(final_logits, None, labels, kd_weight=0.0, ce_weight=1.0, chunk_size=chunk_size)
    total = total + final_weight * ce
    parts["ce_final"] = float(p["ce"])
    target = final_logits.detach()
    for e, logits in exit_logits.items():
        term, p = distill_objective(logits, target, labels, kd_weight=kd_weight, ce_weight=1.0,
                                    temperature=temperature, chunk_size=chunk_size)
        total = total + weights[e] * term
        parts[f"ce_{e}"] = float(p["ce"])
        if kd_weight > 0:
            parts[f"kd_{e}"] = float(p["kd"])
    total = total / total_w
    parts["loss"] = float(total.detach())
    return total, parts
