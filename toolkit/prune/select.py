"""From importance scores and a target `Shape` to the exact structures to keep (`Keep`).

Sizes are uniform (every kept layer keeps the same number of KV groups and MLP channels, so the result
is a plain HF config), but *which* groups and channels survive is chosen per layer, by that layer's
scores. Indices are kept in their original order, so keeping everything is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SlimlmError
from .importance import Importance
from .structure import Shape, shape_of


@dataclass(frozen=True)
class Keep:
    """What survives pruning, as ascending indices into the original model.

    `kv_heads[j]` and `mlp[j]` belong to the j-th *kept* layer (`layers[j]`). A KV head keeps all its
    query heads, so the kept query heads follow from `kv_heads`.
    """

    layers: list[int]
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    hidden: list[int]

    @classmethod
    def everything(cls, model) -> "Keep":
        """Keep every structure: `shrink` with this returns a copy of `model`."""
        s = shape_of(model)
        return cls(list(range(s.num_hidden_layers)),
                   [list(range(s.num_key_value_heads))] * s.num_hidden_layers,
                   [list(range(s.intermediate_size))] * s.num_hidden_layers, list(range(s.hidden_size)))

    def shape(self, model) -> Shape:
        """The `Shape` a model pruned with this `Keep` has."""
        c = model.config
        per_group = c.num_attention_heads // c.num_key_value_heads
        n_kv = len(self.kv_heads[0]) if self.kv_heads else 0
        return Shape(len(self.layers), n_kv * per_group, n_kv, len(self.mlp[0]) if self.mlp else 0, len(self.hidden))


def check_shape(model, shape: Shape) -> None:
    """Refuse a target shape that is larger than the model, empty, or splits a KV group."""
    cur = shape_of(model)
    per_group = cur.num_attention_heads // cur.num_key_value_heads
    for field, want in shape.to_dict().items():
        have = getattr(cur, field)
        if not isinstance(want, int) or isinstance(want, bool) or not 1 <= want <= have:
            raise SlimlmError(f"cannot prune {field} to {want!r}: the model has {have}.",
                              f"Choose an integer from 1 to {have}.")
    if shape.num_attention_heads != shape.num_key_value_heads * per_group:
        raise SlimlmError(
            f"{shape.num_attention_heads} attention heads with {shape.num_key_value_heads} KV heads cannot keep "
            f"the model's {per_group} query heads per KV group in every layer.",
            f"Pruning removes whole KV groups (a KV head with its {per_group} query heads): choose "
            f"num_attention_heads = {per_group} x num_key_value_heads, e.g. "
            + ", ".join(f"{g * per_group}/{g}" for g in range(1, cur.num_key_value_heads + 1)) + ".")


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` highest scores, ascending; ties go to the lower index (stable, reproducible)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select(model, importance: Importance, shape: Shape) -> Keep:
    """Choose the structures to keep so that the pruned model has `shape`.

    Layers: the `num_hidden_layers` with the highest block importance. In each kept layer: the
    `num_key_value_heads` KV groups with the highest group score and the `intermediate_size` highest MLP
    channels. Hidden channels: the `hidden_size` highest, shared by all layers (the residual stream is one).
    """
    check_shape(model, shape)
    layers = top(importance.layers, shape.num_hidden_layers)
    groups = importance.groups()  # [L, n_kv]
    return Keep(layers=layers,
                kv_heads=[top(groups[i], shape.num_key_value_heads) for i in layers],
                mlp=[top(importance.mlp[i], shape.intermediate_size) for i in layers],
                hidden=top(importance.hidden, shape.hidden_size))
