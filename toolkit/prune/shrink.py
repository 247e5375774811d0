"""Structured removal: build the smaller model that keeps exactly the structures in a `Keep`.

The result is not the old model with tensors swapped in place: it is a fresh model built by
`AutoModelForCausalLM.from_config` from a plain HF config (new sizes, `head_dim` written out since it
no longer follows from `hidden_size / num_attention_heads`, `layer_types` cut to the kept layers), with
a state dict sliced from the original. Whatever that model computes is therefore what
`from_pretrained` of its export computes; no stale attribute of the old modules can survive.

Every weight is sliced by the axis table in `structure.py`: hidden channels everywhere the residual
stream appears (embedding columns, every norm, projection inputs/outputs, and the LM head, which stays
tied when it was), query rows/`o_proj` columns of the kept query heads (whole KV groups, or the same
number of heads in each kept group), k/v rows of the kept KV heads, MLP
rows/columns of the kept channels, biases along with their rows. Qwen3's q/k norms act per `head_dim`
and stay as they are.
"""
from __future__ import annotations

import copy

import torch

from ..errors import SlimlmError
from .select import Keep
from .structure import head_dim, roles_of, shape_of, split_key


def shrink(model, keep: Keep, norm_scale: dict[str, float] | None = None):
    """Return a new model (same class, dtype and device, eval mode) holding only what `keep` keeps.

    `norm_scale` multiplies named norm weights (`model.layers.3.input_layernorm.weight`: factor), to keep
    their outputs at size when hidden channels go (see `importance.norm_scales`).
    """
    from transformers import AutoModelForCausalLM

    cur = shape_of(model)  # also refuses unsupported models
    _check_keep(keep, cur)
    c = model.config
    d = head_dim(c)
    q_heads = keep.query_heads(model)
    new_shape = keep.shape(model)

    config = copy.deepcopy(c)
    for field, value in new_shape.to_dict().items():
        setattr(config, field, value)
    config.head_dim = d
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [c.layer_types[i] for i in keep.layers]
    if isinstance(getattr(config, "max_window_layers", None), int):
        # Qwen2: layers at index >= max_window_layers use the sliding window; count only kept ones below it.
        config.max_window_layers = sum(1 for i in keep.layers if i < c.max_window_layers)

    rows = lambda heads: torch.tensor([h * d + k for h in heads for k in range(d)])  # noqa: E731
    hidden = torch.tensor(keep.hidden)
    index = []  # per kept layer: axis -> indices into the original
    for j, _ in enumerate(keep.layers):
        # Query heads stay in ascending order, so the kept ones of each group are contiguous and the pruned
        # model's GQA (query head i reads KV head i // p) pairs each with its own KV head.
        index.append({"hidden": hidden, "q": rows(q_heads[j]), "kv": rows(keep.kv_heads[j]),
                      "mlp": torch.tensor(keep.mlp[j])})
    position = {old: new for new, old in enumerate(keep.layers)}

    state = {}
    for name, tensor in model.state_dict().items():  # holds a tied lm_head too; sliced the same way
        layer, rest = split_key(name)
        roles, original = roles_of(name), name
        if layer is not None:
            if layer not in position:
                continue
            axes = index[position[layer]]
            name = f"model.layers.{position[layer]}.{rest}"
        else:
            axes = {"hidden": hidden}
        t = tensor.detach()
        if norm_scale and original in norm_scale:
            t = t * norm_scale[original]
        for dim, role in enumerate(roles):
            if role is not None:
                t = t.index_select(dim, axes[role].to(t.device))
        state[name] = t

    from transformers.initialization import no_init_weights

    dtype = next(model.parameters()).dtype
    with no_init_weights():  # every weight is overwritten below; random init would only cost time
        small = AutoModelForCausalLM.from_config(config, dtype=dtype)
    small.tie_weights()  # skipped with the init above; without it a tied LM head would be a copy
    missing, unexpected = small.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug, not a user error: the axis table and the model disagree
        raise RuntimeError(f"pruned state dict does not fit the pruned model: missing {missing}, "
                           f"unexpected {unexpected}")
    small.generation_config = copy.deepcopy(model.generation_config)
    small.name_or_path = getattr(model, "name_or_path", "")
    return small.to(next(model.parameters()).device).eval()


def _check_keep(keep: Keep, cur) -> None:
    def ok(indices, size, what):
        if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= size:
            raise SlimlmError(f"invalid {what} to keep: {_short(indices)}.",
                              f"Expected a non-empty ascending list of distinct indices below {size}.")

    ok(keep.layers, cur.num_hidden_layers, "layers")
    ok(keep.hidden, cur.hidden_size, "hidden channels")
    if len(keep.kv_heads) != len(keep.layers) or len(keep.mlp) != len(keep.layers):
        raise SlimlmError("a Keep needs one list of KV heads and one of MLP channels per kept layer.")
    for j, layer in enumerate(keep.layers):
        ok(keep.kv_heads[j], cur.num_key_value_heads, f"KV heads of layer {layer}")
        ok(keep.mlp[j], cur.intermediate_size, f"MLP channels of layer {layer}")
    if len({len(k) for k in keep.kv_heads}) > 1 or len({len(m) for m in keep.mlp}) > 1:
        raise SlimlmError("every kept layer must keep the same number of KV heads and of MLP channels.",
                          "Uniform shapes are what lets a plain HF config describe the pruned model.")
    if keep.q_heads is None:
        return
    per_group = cur.num_attention_heads // cur.num_key_value_heads
    if len(keep.q_heads) != len(keep.layers):
        raise SlimlmError("a Keep needs one list of query heads per kept layer.")
    counts = set()
    for j, layer in enumerate(keep.layers):
        ok(keep.q_heads[j], cur.num_attention_heads, f"query heads of layer {layer}")
        per = [sum(1 for h in keep.q_heads[j] if h // per_group == g) for g in range(cur.num_key_value_heads)]
        if any(n and g not in keep.kv_heads[j] for g, n in enumerate(per)) \
                or any(per[g] != per[keep.kv_heads[j][0]] for g in keep.kv_heads[j]):
            raise SlimlmError(f"layer {layer} keeps query heads {_short(keep.q_heads[j])} with KV heads "
                              f"{keep.kv_heads[j]}: every kept KV group must keep the same number of query heads, "
                              "and no query head may outlive its KV group.",
                              f"Query head h belongs to KV group h // {per_group}.")
        counts.add(len(keep.q_heads[j]))
    if len(counts) > 1:
        raise SlimlmError("every kept layer must keep the same number of query heads.",
                          "Uniform shapes are what lets a plain HF config describe the pruned model.")


def _short(indices) -> str:
    s = str(list(indices))
    return s if len(s) < 80 else s[:77] + "..."
