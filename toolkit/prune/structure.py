"""What a prunable model looks like: its shape, which axis each weight dimension lies on, its size.

Pruning works on the Llama family of decoder layers as transformers 5 builds them (Llama, Qwen2 with
attention bias, Qwen3 with per-head q/k norms, Mistral): every weight of the model has one known name,
and every dimension of it lies on one *axis*:

- `hidden`: the residual stream width (embedding columns, norm weights, projection inputs/outputs);
- `q` / `kv`: query / key-value head rows, `head_dim` rows per head;
- `mlp`: intermediate channels of the gated MLP;
- None: a dimension pruning never touches (vocabulary, `head_dim` of the q/k norms).

The one table `LAYER_ROLES` (+ `GLOBAL_ROLES`) drives both the exact parameter count of a planned shape
and the slicing in `shrink`, so the two cannot disagree. A weight not in the table is refused rather
than guessed: slicing the wrong dimension of an unknown weight would give a broken model silently.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

from ..errors import SlimlmError

# Weight name inside a decoder layer -> axis of each dimension ([out, in] for Linear weights).
LAYER_ROLES: dict[str, tuple] = {
    "self_attn.q_proj.weight": ("q", "hidden"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"), "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"), "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"), "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),  # per head_dim (Qwen3)
    "mlp.gate_proj.weight": ("mlp", "hidden"), "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "hidden"), "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hidden", "mlp"), "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",),
}
GLOBAL_ROLES: dict[str, tuple] = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"), "lm_head.bias": (None,),
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SUPPORTED = "Llama, Mistral, Qwen2 and Qwen3 style decoders (transformers 5)"


@dataclass(frozen=True)
class Shape:
    """The prunable sizes of a model, named as in its HF config. Every layer has the same shape."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    hidden_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_key(name: str) -> tuple[int | None, str]:
    """`model.layers.3.mlp.up_proj.weight` -> (3, "mlp.up_proj.weight"); a global name -> (None, name)."""
    m = _LAYER_KEY.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def roles_of(name: str) -> tuple:
    """The axis of each dimension of the weight `name`; SlimlmError for a weight pruning does not know."""
    layer, rest = split_key(name)
    roles = LAYER_ROLES.get(rest) if layer is not None else GLOBAL_ROLES.get(rest)
    if roles is None:
        raise SlimlmError(f"cannot prune this model: it has a weight {name!r} that slimlm's pruning does "
                          "not know how to slice.", f"Structured pruning supports {_SUPPORTED}.")
    return roles


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def shape_of(model) -> Shape:
    """The current `Shape` of `model`, after checking that pruning supports it (see `check_supported`)."""
    check_supported(model)
    c = model.config
    return Shape(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
                 c.hidden_size)


def check_supported(model) -> None:
    """Refuse models whose weights pruning cannot slice consistently (unknown weights, ragged layers)."""
    c = getattr(model, "config", None)
    needed = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
    if c is None or any(not isinstance(getattr(c, k, None), int) for k in needed) \
            or not hasattr(getattr(model, "model", None), "layers"):
        raise SlimlmError(f"cannot prune a {type(model).__name__}: it is not a decoder-only causal LM "
                          "with the usual HF config fields.", f"Structured pruning supports {_SUPPORTED}.")
    if getattr(model, "is_quantized", False) and not _gguf_dequantized(model):
        raise SlimlmError("cannot prune a quantized model.", "Prune the full-precision model, then quantize it.")
    layer_shapes: dict[str, tuple] = {}
    for name, p in model.named_parameters():
        roles_of(name)
        layer, rest = split_key(name)
        if layer is not None and layer_shapes.setdefault(rest, tuple(p.shape)) != tuple(p.shape):
            raise SlimlmError(f"cannot prune: layer {layer} has {rest} of shape {tuple(p.shape)}, other layers "
                              f"{layer_shapes[rest]}.", "Pruning keeps shapes uniform, so it needs uniform layers.")
    if len(model.model.layers) != c.num_hidden_layers:
        raise SlimlmError(f"the model has {len(model.model.layers)} layers but its config says {c.num_hidden_layers}.")
    if c.num_attention_heads % c.num_key_value_heads:
        raise SlimlmError(f"{c.num_attention_heads} attention heads do not split into {c.num_key_value_heads} "
                          "KV groups.", "The model's config is inconsistent.")


def head_layouts(num_attention_heads: int, num_key_value_heads: int) -> list[tuple[int, int, int]]:
    """Every way to keep attention heads uniformly: `(heads, kv_groups, heads_per_group)`, best first.

    A pruned layer keeps `g` of the KV groups and the same number `p` of query heads in each (GQA maps
    query head `j` to KV head `j // p`, so a ragged group has no HF config). For one head count, whole
    groups come first: on SmolLM2-135M pruned to half (activation scores, no retraining) 6 heads as 2
    groups of 3 gave held-out perplexity 2734, as 3 groups of 2 4528 (same other sizes).
    """
    per_group = num_attention_heads // num_key_value_heads
    out = [(g * p, g, p) for g in range(1, num_key_value_heads + 1) for p in range(1, per_group + 1)]
    return sorted(out, key=lambda x: (x[0], -x[2]))


def hidden_needs_heads_divisor(config) -> bool:
    """True where transformers refuses a config whose `hidden_size` is not a multiple of `num_attention_heads`.

    transformers 5's `LlamaConfig` checks `hidden_size % num_attention_heads == 0` when a config is saved or
    loaded (`validate_architecture`), although with `head_dim` written out the model never uses the quotient;
    Qwen2, Qwen3 and Mistral do not. Found by asking the config class itself: the model's own config must
    pass, and the same config with `hidden_size` one larger must fail.
    """
    n = config.num_attention_heads
    validate = getattr(config, "validate", None)
    if n <= 1 or validate is None:
        return False
    probe = copy.deepcopy(config)
    probe.head_dim = head_dim(config)
    try:
        validate()
    except Exception:  # the unpruned config fails already: nothing to learn from the probe
        return False
    probe.hidden_size = config.hidden_size + 1 if config.hidden_size % n == 0 else config.hidden_size
    try:
        probe.validate()
    except Exception:
        return True
    return False


def _gguf_dequantized(model) -> bool:
    # A GGUF load dequantizes every weight to float but keeps the quantizer attached; that is prunable.
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return "gguf" in str(getattr(method, "value", method)).lower()


def axis_sizes(shape: Shape, config) -> dict:
    """Length of each axis for `shape`; `None` maps to no resizing."""
    d = head_dim(config)
    return {"hidden": shape.hidden_size, "q": shape.num_attention_heads * d, "kv": shape.num_key_value_heads * d,
            "mlp": shape.intermediate_size}


def count_params(model, shape: Shape | None = None) -> int:
    """Exact parameter count of `model` pruned to `shape` (None: as it is); shared (tied) weights count once.

    Every layer has the same weights, so the count is the global weights plus `num_hidden_layers` times
    one layer's weights, each with its pruned dimensions resized.
    """
    current = shape_of(model)
    shape = shape or current
    sizes = axis_sizes(shape, model.config)
    total = 0
    per_layer: dict[str, int] = {}
    for name, p in model.named_parameters():  # deduplicated: a tied lm_head appears once
        roles = roles_of(name)
        n = 1
        for dim, role in zip(p.shape, roles):
            n *= dim if role is None else sizes[role]
        layer, rest = split_key(name)
        if layer is None:
            total += n
        else:
            per_layer[rest] = n
    return total + shape.num_hidden_layers * sum(per_layer.values())
