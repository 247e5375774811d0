"""Exit heads: logits after decoder layer E, through a norm and the model's own LM head.

Exit E reads h_E, the output of the E-th decoder layer (1-based: E layers have run; the same tensor
as `hidden_states[E]` of HF's `output_hidden_states` for E < L, but *before* the final norm for
E = L, where HF hands back the normed state). Its logits are `lm_head(norm_E(h_E))`, where norm_E is
the model's final norm (`shared`, as in LayerSkip: no new weights) or a copy of it with weights of
its own (`own`: same class and eps, weight initialised from the final norm). `lens` adds an affine map
of its own after that norm: logits = `lm_head(n + proj_E(n))` with n = norm_E(h_E) and proj_E a
[hidden, hidden] linear layer with bias, zero at first (so it starts as `own`) and fitted by
`fit_lenses` (lens.py) to predict what the LM head reads from the last layer. The LM head is always
the model's. So with a shared norm the exit at E = L gives exactly the model's logits.

h_E is taken by a forward hook on decoder layer E - 1 (0-based), not from `output_hidden_states`,
because HF replaces the last of those by the normed state and would need all L of them kept.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import SlimlmError

NORMS = ("shared", "own", "lens")


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`model.model.layers`: Llama, Qwen2/3, Mistral, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SlimlmError(f"{type(model).__name__} has no `model.layers`, so exits cannot be attached.",
                          "Early exits support HF decoder-only models laid out like Llama or Qwen.")
    return layers


def final_norm(model) -> nn.Module:
    """The norm the model applies before its LM head (`model.model.norm`)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if not isinstance(norm, nn.Module):
        raise SlimlmError(f"{type(model).__name__} has no `model.norm` (final norm) to share with its exits.")
    return norm


def check_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """`layers` sorted, each an int in [1, num_layers] and listed once; SlimlmError otherwise."""
    layers = list(layers)
    if not layers:
        raise SlimlmError("no exit layers given.", f"Name one or more layers in 1..{num_layers}, e.g. [{max(1, num_layers // 2)}].")
    bad = [e for e in layers if not isinstance(e, int) or isinstance(e, bool) or not 1 <= e <= num_layers]
    if bad:
        raise SlimlmError(f"exit layer(s) {bad} out of range: the model has {num_layers} decoder layers.",
                          f"Exit E means 'after decoder layer E'; use values in 1..{num_layers}.")
    if len(set(layers)) != len(layers):
        raise SlimlmError(f"exit layers {layers} repeat a layer.", "List each exit layer once.")
    return sorted(layers)


class ExitHead(nn.Module):
    """One exit's own weights: `norm` (a copy of the model's final norm) and, for a lens, `proj`."""

    def __init__(self, norm: nn.Module, lens: bool = False):
        super().__init__()
        self.norm = norm
        if lens:
            weight = norm.weight
            self.proj = nn.Linear(weight.numel(), weight.numel(), bias=True, device=weight.device, dtype=weight.dtype)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """h_E [..., D] -> the state the LM head reads, [..., D]."""
        normed = self.norm(hidden)
        return normed + self.proj(normed) if hasattr(self, "proj") else normed


class ExitHeads(nn.Module):
    """The exits of one model. Holds no reference to the model: pass it to `forward`, so the model is
    not registered twice (DDP, checkpoints). State dict keys: `exits.{E}.norm.weight` (own norms and lenses),
    `exits.{E}.proj.weight` and `exits.{E}.proj.bias` (lenses).
    """

    def __init__(self, layers: Iterable[int], num_layers: int, norm: str = "shared", norm_module: nn.Module | None = None):
        super().__init__()
        if norm not in NORMS:
            raise SlimlmError(f"unknown exit norm {norm!r}.", f"Expected one of: {', '.join(NORMS)}.")
        if norm != "shared" and norm_module is None:
            raise SlimlmError(f"{norm} exits need the model's final norm to copy (norm_module).")
        self.layers, self.num_layers, self.norm_kind = check_layers(layers, num_layers), num_layers, norm
        self.exits = nn.ModuleDict()
        if norm != "shared":
            for e in self.layers:
                head = ExitHead(copy.deepcopy(norm_module), lens=norm == "lens")
                head.requires_grad_(True)
                self.exits[str(e)] = head

    @classmethod
    def for_model(cls, model, layers: Iterable[int], norm: str = "shared") -> "ExitHeads":
        """Exits at `layers` of `model`; own norms start as copies of its final norm (on its device)."""
        return cls(layers, len(decoder_layers(model)), norm, final_norm(model) if norm != "shared" else None)

    def norm_for(self, model, layer: int) -> nn.Module:
        """The module that maps h_E to what the LM head reads: the final norm, or exit E's own head."""
        return self.exits[str(layer)] if self.norm_kind != "shared" else final_norm(model)

    def logits(self, model, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, D] = h_E -> logits [B, T, V]."""
        return model.get_output_embeddings()(self.norm_for(model, layer)(hidden))

    def forward(self, model, hidden: dict[int, torch.Tensor], layers: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Logits [B, T, V] of each exit in `layers` (default: all) from captured `hidden[E]` [B, T, D]."""
        return {e: self.logits(model, e, hidden[e]) for e in (self.layers if layers is None else layers)}


@contextlib.contextmanager
def capture_hidden(model, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward of `model` fills the yielded dict with h_E [B, T, D] per E."""
    store: dict[int, torch.Tensor] = {}
    mods = decoder_layers(model)
    handles = [mods[e - 1].register_forward_hook(functools.partial(_keep, store, e)) for e in set(layers)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _keep(store: dict, layer: int, module, args, output) -> None:
    store[layer] = output[0] if isinstance(output, (tuple, list)) else output


def exit_logits(model, input_ids: torch.Tensor, exits: ExitHeads, attention_mask: torch.Tensor | None = None,
                layers: Iterable[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass: `(final_logits [B, T, V], {E: exit logits [B, T, V]})` for `layers` (default all)."""
    layers = exits.layers if layers is None else list(layers)
    with capture_hidden(model, layers) as hidden:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits, exits(model, hidden, layers)
