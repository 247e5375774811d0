"""From importance scores and a target `Shape` to the exact structures to keep (`Keep`).

Sizes are uniform (every kept layer keeps the same number of KV groups, of query heads in each group
and of MLP channels, so the result is a plain HF config), but *which* groups, heads and channels
survive is chosen per layer, by that layer's scores. Indices are kept in their original order, so
keeping everything is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlimlmError
from .importance import Importance
from .structure import Shape, head_layouts, hidden_needs_heads_divisor, shape_of


@dataclass(frozen=True)
class Keep:
    """What survives pruning, as ascending indices into the original model.

    `kv_heads[j]`, `mlp[j]` and `q_heads[j]` belong to the j-th *kept* layer (`layers[j]`). `q_heads`
    (original query-head indices) must keep the same number of query heads in every kept KV group and
    none outside them; None keeps every query head of the kept groups (whole-group pruning).
    """

    layers: list[int]
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    hidden: list[int]
    q_heads: list[list[int]] | None = None

    @classmethod
    def everything(cls, model) -> "Keep":
        """Keep every structure: `shrink` with this returns a copy of `model`."""
        s = shape_of(model)
        return cls(list(range(s.num_hidden_layers)),
                   [list(range(s.num_key_value_heads))] * s.num_hidden_layers,
                   [list(range(s.intermediate_size))] * s.num_hidden_layers, list(range(s.hidden_size)),
                   [list(range(s.num_attention_heads))] * s.num_hidden_layers)

    def query_heads(self, model) -> list[list[int]]:
        """Kept query heads per kept layer (original indices), whether given or implied by `kv_heads`."""
        if self.q_heads is not None:
            return self.q_heads
        c = model.config
        per_group = c.num_attention_heads // c.num_key_value_heads
        return [[g * per_group + r for g in groups for r in range(per_group)] for groups in self.kv_heads]

    def shape(self, model) -> Shape:
        """The `Shape` a model pruned with this `Keep` has."""
        q = self.query_heads(model)
        n_kv = len(self.kv_heads[0]) if self.kv_heads else 0
        return Shape(len(self.layers), len(q[0]) if q else 0, n_kv, len(self.mlp[0]) if self.mlp else 0,
                     len(self.hidden))


def check_shape(model, shape: Shape) -> None:
    """Refuse a target shape that is larger than the model, empty, has ragged KV groups, or that
    transformers would refuse to load (hidden size not a multiple of the heads, for Llama)."""
    cur = shape_of(model)
    per_group = cur.num_attention_heads // cur.num_key_value_heads
    for field, want in shape.to_dict().items():
        have = getattr(cur, field)
        if not isinstance(want, int) or isinstance(want, bool) or not 1 <= want <= have:
            raise SlimlmError(f"cannot prune {field} to {want!r}: the model has {have}.",
                              f"Choose an integer from 1 to {have}.")
    heads, groups = shape.num_attention_heads, shape.num_key_value_heads
    if heads % groups or heads // groups > per_group:
        options = ", ".join(f"{h}/{g}" for h, g, _ in head_layouts(cur.num_attention_heads, cur.num_key_value_heads))
        raise SlimlmError(
            f"{heads} attention heads with {groups} KV heads cannot keep the same number of query heads per KV "
            f"group (at most the model's {per_group}) in every layer.",
            f"Pruning keeps g of the {cur.num_key_value_heads} KV groups and p of the {per_group} query heads in "
            f"each: choose num_attention_heads/num_key_value_heads among {options}.")
    if shape.hidden_size % heads and hidden_needs_heads_divisor(model.config):
        raise SlimlmError(
            f"a hidden size of {shape.hidden_size} with {heads} attention heads would not load: transformers "
            f"requires hidden_size to be a multiple of num_attention_heads for a {type(model.config).__name__}.",
            f"Choose a hidden size divisible by {heads}, or a head count that divides {shape.hidden_size}.")


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending; ties go to the lower index (stable, reproducible)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select(model, importance: Importance, shape: Shape) -> Keep:
    """Choose the structures to keep so that the pruned model has `shape`.

    Layers: the `num_hidden_layers` with the highest block importance. In each kept layer: the
    `p = num_attention_heads / num_key_value_heads` highest-scoring query heads of each KV group, the
    `num_key_value_heads` groups whose KV score plus those `p` heads' scores is highest, and the
    `intermediate_size` highest MLP channels. Hidden channels: the `hidden_size` highest, shared by all
    layers (the residual stream is one).
    """
    check_shape(model, shape)
    c = model.config
    per_group = c.num_attention_heads // c.num_key_value_heads
    p = shape.num_attention_heads // shape.num_key_value_heads
    layers = top(importance.layers, shape.num_hidden_layers)
    q_heads, kv_heads = [], []
    for i in layers:
        by_group = importance.heads[i].view(c.num_key_value_heads, per_group)  # [n_kv, per_group]
        best = [top(row, p) for row in by_group]  # within-group indices
        score = importance.kv_heads[i] + torch.stack([row[b].sum() for row, b in zip(by_group, best)])
        groups = top(score, shape.num_key_value_heads)
        kv_heads.append(groups)
        q_heads.append([g * per_group + r for g in groups for r in best[g]])
    return Keep(layers=layers, kv_heads=kv_heads, mlp=[top(importance.mlp[i], shape.intermediate_size) for i in layers],
                hidden=top(importance.hidden, shape.hidden_size), q_heads=q_heads)
