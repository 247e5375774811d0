"""Layer dropout: in training, skip decoder layer l with a probability that grows with depth.

Skipping deep layers now and then teaches the earlier layers to produce states the LM head can read
(LayerSkip, Elhoushi et al. 2024), and costs nothing at inference: it is off in eval mode.

Rates, for layer l = 0 .. L-1 and f = l / (L - 1):
- `linear`:      p_l = p_max * f
- `exponential`: p_l = p_max * (2**f - 1)  (LayerSkip's curve: near 0 for early layers, p_max at the last)
- `constant`:    p_l = p_max

A skipped layer returns its input unchanged, for the whole micro-batch (so the compute is saved).
Draws are deterministic: the decision for layer l at step s comes from a generator seeded with
(seed, s, l), so a resumed run makes the same choices; call `set_step` before each forward (without
it, the step advances by one per forward of the first layer).

With `keep_graph` (default) a skipped layer adds 0 * sum(its parameters) to its output: its weights
get a zero gradient instead of none, which DDP (find_unused_parameters=False) requires of every rank.
"""
from __future__ import annotations

import torch

from ..errors import SlimlmError
from .heads import decoder_layers

SCHEDULES = ("linear", "exponential", "constant")


def dropout_rates(num_layers: int, p_max: float, schedule: str = "exponential") -> list[float]:
    """Skip probability of each decoder layer, first to last."""
    if schedule not in SCHEDULES:
        raise SlimlmError(f"unknown layer-dropout schedule {schedule!r}.", f"Expected one of: {', '.join(SCHEDULES)}.")
    if not 0.0 <= p_max < 1.0:
        raise SlimlmError(f"layer dropout p_max must be in [0, 1), got {p_max}.")
    rates = []
    for layer in range(num_layers):
        f = layer / max(1, num_layers - 1)
        rates.append(p_max * {"linear": f, "exponential": 2 ** f - 1, "constant": 1.0}[schedule])
    return rates


class LayerDropout:
    """Installs depth-growing layer dropout on an HF model's decoder layers; `remove()` undoes it."""

    def __init__(self, model, p_max: float, schedule: str = "exponential", seed: int = 0, keep_graph: bool = True):
        self.layers = decoder_layers(model)
        self.rates = dropout_rates(len(self.layers), p_max, schedule)
        self.seed, self.keep_graph = seed, keep_graph
        self.step, self.skipped = 0, 0  # skipped: layers skipped so far (statistics)
        self._auto = True
        self.installed = False

    def set_step(self, step: int) -> None:
        """Make the draws of the next forward those of `step` (e.g. the micro-batch counter)."""
        self.step, self._auto = step, False

    def skips(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) is skipped at the current step (the same answer every call)."""
        if self.rates[layer] <= 0.0:
            return False
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003) + self.step) * 4099 + layer)
        return float(torch.rand((), generator=gen)) < self.rates[layer]

    def install(self) -> "LayerDropout":
        for i, layer in enumerate(self.layers):
            layer.forward = _SkippableForward(self, i, layer.forward)  # the instance attribute wins
        self.installed = True
        return self

    def remove(self) -> None:
        for layer in self.layers:
            if isinstance(layer.__dict__.get("forward"), _SkippableForward):
                del layer.forward
        self.installed = False


class _SkippableForward:
    """The wrapped `forward` of one layer (a class, not a closure, so it can be recognised and removed)."""

    def __init__(self, dropout: LayerDropout, index: int, forward):
        self.dropout, self.index, self.forward = dropout, index, forward

    def __call__(self, *args, **kwargs):
        d, layer = self.dropout, self.dropout.layers[self.index]
        if d._auto and self.index == 0 and layer.training:
            d.step += 1
        if not (layer.training and d.skips(self.index)):
            return self.forward(*args, **kwargs)
        d.skipped += 1
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
        if d.keep_graph and torch.is_grad_enabled():
            params = [p for p in layer.parameters() if p.requires_grad]
            if params:
                hidden = hidden + 0.0 * sum(p.sum() for p in params).to(hidden.dtype)
        return hidden
