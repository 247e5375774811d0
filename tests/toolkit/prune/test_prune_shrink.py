"""Structured removal against hand-built references: masking the removed structures in the original
model computes exactly what the pruned model computes, and the pruned export reloads with plain
transformers."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import write
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.prune import Keep, count_params, shrink

ARCHS = ["llama", "qwen2", "qwen3"]


def tokens(seed=0, shape=(2, 24)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def make(arch, **kw):
    # 3 layers, 4 heads in 2 KV groups of 2, hidden 64, MLP 128; weights a little larger than HF's init
    # so that every structure matters to the logits.
    model, _ = tiny_model(arch, num_hidden_layers=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def masked_reference(model, keep: Keep):
    """The original model with everything `keep` drops switched off, by hand, without slicing a tensor.

    Removed query heads (of a removed KV group, or dropped within a kept one): their o_proj columns are zero
    (the head's output is never read); a kept head still reads its own original KV head.
    Removed MLP channels: their down_proj columns are zero.
    Removed layers: a hook returns the layer's input unchanged.
    Removed hidden channels: dead in the residual stream (zero embedding columns and o_proj/down_proj rows),
    and every hidden RMSNorm takes its mean square over the kept channels only.
    """
    ref = copy.deepcopy(model)
    c = ref.config
    d, per_group = 16, c.num_attention_heads // c.num_key_value_heads  # every tiny model has head_dim 16
    dead = torch.ones(c.hidden_size, dtype=torch.bool)
    dead[keep.hidden] = False
    kept_hidden = torch.tensor(keep.hidden)
    hooks = []

    def kept_channel_norm(mod, args, out):
        x = args[0]  # [B, T, H]
        y = torch.zeros_like(out)
        xk = x[..., kept_hidden].float()
        y[..., kept_hidden] = (xk * torch.rsqrt(xk.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).to(
            x.dtype) * mod.weight[kept_hidden]
        return y

    with torch.no_grad():
        ref.model.embed_tokens.weight[:, dead] = 0
        for i, layer in enumerate(ref.model.layers):
            if i not in keep.layers:
                hooks.append(layer.register_forward_hook(lambda mod, args, kwargs, out: args[0] if args
                                                         else kwargs["hidden_states"], with_kwargs=True))
                continue
            j = keep.layers.index(i)
            attn, mlp = layer.self_attn, layer.mlp
            for h in range(c.num_attention_heads):
                if keep.q_heads is None and h // per_group not in keep.kv_heads[j] \
                        or keep.q_heads is not None and h not in keep.q_heads[j]:
                    attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            gone = torch.ones(c.intermediate_size, dtype=torch.bool)
            gone[keep.mlp[j]] = False
            mlp.down_proj.weight[:, gone] = 0
            attn.o_proj.weight[dead] = 0
            mlp.down_proj.weight[dead] = 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                hooks.append(norm.register_forward_hook(kept_channel_norm))
        hooks.append(ref.model.norm.register_forward_hook(kept_channel_norm))
    return ref


KEEPS = {  # for 3 layers, 2 KV groups, MLP 128, hidden 64
    "heads": lambda: Keep([0, 1, 2], [[1], [0], [1]], [list(range(128))] * 3, list(range(64))),
    "mlp": lambda: Keep([0, 1, 2], [[0, 1]] * 3, [list(range(0, 128, 2)), list(range(64)), list(range(64, 128))],
                        list(range(64))),
    "depth": lambda: Keep([0, 2], [[0, 1]] * 2, [list(range(128))] * 2, list(range(64))),
    "width": lambda: Keep([0, 1, 2], [[0, 1]] * 3, [list(range(128))] * 3, sorted({*range(0, 64, 3), 1, 62})),
    "all": lambda: Keep([1, 2], [[1], [0]], [list(range(18)), [3, 7] + list(range(100, 116))], list(range(8, 40))),
    # One query head of each of the 2 groups (heads 0,1 | 2,3), a different one per layer.
    "qheads": lambda: Keep([0, 1, 2], [[0, 1]] * 3, [list(range(128))] * 3, list(range(64)), [[0, 2], [1, 3], [0, 3]]),
    # Fewer groups and fewer heads in each, with MLP, width and depth pruned too.
    "qall": lambda: Keep([0, 2], [[1], [0]], [list(range(0, 128, 4)), list(range(32))], list(range(16, 48)),
                         [[3], [0]]),
}


# Each axis alone on Llama (GQA, tied), heads on Qwen2 (biases), every axis at once on all three families.
CASES = ([("llama", a) for a in ("heads", "mlp", "depth", "width", "qheads")] + [("qwen2", "heads")]
         + [(a, "all") for a in ARCHS] + [(a, "qall") for a in ARCHS])


@pytest.mark.parametrize("arch, axis", CASES)
def test_pruned_model_equals_masked_original(arch, axis):
    model = make(arch)
    keep = KEEPS[axis]()
    small = shrink(model, keep)
    ids = tokens()
    got, want, full = logits(small, ids), logits(masked_reference(model, keep), ids), logits(model, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - full).abs().max() > 1e-3  # the pruning did change the model, so equality means something
    assert small.config.num_hidden_layers == len(keep.layers) == len(small.model.layers)
    assert small.config.num_key_value_heads == len(keep.kv_heads[0])
    assert small.config.num_attention_heads == len(keep.query_heads(model)[0])
    assert small.config.hidden_size == len(keep.hidden) and small.config.head_dim == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_everything_is_the_identity(arch):
    model = make(arch)
    small = shrink(model, Keep.everything(model))
    ids = tokens(1)
    torch.testing.assert_close(logits(small, ids), logits(model, ids), atol=0, rtol=0)
    assert count_params(small) == count_params(model)


def test_width_slices_every_tensor_and_keeps_the_head_tied():
    model = make("llama")
    keep = KEEPS["width"]()
    small = shrink(model, keep)
    h = torch.tensor(keep.hidden)
    assert small.lm_head.weight is small.model.embed_tokens.weight
    torch.testing.assert_close(small.model.embed_tokens.weight, model.model.embed_tokens.weight[:, h])
    torch.testing.assert_close(small.model.norm.weight, model.model.norm.weight[h])
    a, b = small.model.layers[1], model.model.layers[1]
    torch.testing.assert_close(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight[:, h])
    torch.testing.assert_close(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight[h])
    torch.testing.assert_close(a.mlp.down_proj.weight, b.mlp.down_proj.weight[h])
    torch.testing.assert_close(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight[h])


def test_norm_scale_multiplies_the_named_norms_of_the_original_layers():
    model = make("qwen3")
    keep = KEEPS["all"]()  # keeps original layers 1 and 2
    scale = {"model.layers.2.input_layernorm.weight": 2.0, "model.norm.weight": 0.5,
             "model.layers.0.post_attention_layernorm.weight": 3.0}  # layer 0 is dropped: no effect
    a, b = shrink(model, keep), shrink(model, keep, scale)
    torch.testing.assert_close(b.model.layers[1].input_layernorm.weight, 2 * a.model.layers[1].input_layernorm.weight)
    torch.testing.assert_close(b.model.norm.weight, 0.5 * a.model.norm.weight)
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                 "model.layers.1.post_attention_layernorm.weight", "model.layers.1.self_attn.q_norm.weight"):
        torch.testing.assert_close(b.state_dict()[name], a.state_dict()[name], atol=0, rtol=0)


def test_qwen2_biases_follow_their_heads():
    model = make("qwen2")
    keep = KEEPS["heads"]()
    small = shrink(model, keep)
    d = 16
    # layer 1 keeps KV group 0 -> query heads 0, 1 -> q rows 0..31, k/v rows 0..15
    new, old = [layer.self_attn for layer in small.model.layers], [layer.self_attn for layer in model.model.layers]
    torch.testing.assert_close(new[1].q_proj.bias, old[1].q_proj.bias[:2 * d])
    torch.testing.assert_close(new[2].k_proj.bias, old[2].k_proj.bias[d:])
    torch.testing.assert_close(new[0].v_proj.bias, old[0].v_proj.bias[d:])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["all", "qall"])
def test_export_reloads_with_plain_transformers(arch, case, tmp_path):
    model = make(arch)
    small = shrink(model, KEEPS[case]())
    out = write(small, None, tmp_path / "pruned", meta={"transforms": {"pruned_shapes": {"test": True}}})
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 16 and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == (2 if case == "all" else 1) and config["num_key_value_heads"] == 1
    assert "auto_map" not in config  # no custom code
    if arch != "llama":
        assert config["layer_types"] == ["full_attention"] * 2
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokens(2)
    torch.testing.assert_close(logits(loaded, ids), logits(small, ids), atol=0, rtol=0)
    assert count_params(loaded) == count_params(small)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (arch == "llama")


def test_qwen2_sliding_window_layers_stay_the_same_kind():
    model = make("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    small = shrink(model, KEEPS["depth"]())  # keeps layers 0 and 2
    assert small.config.layer_types == ["full_attention", "sliding_attention"]
    assert small.config.max_window_layers == 1
    torch.testing.assert_close(logits(small, tokens(3, (1, 20))),
                               logits(masked_reference(model, KEEPS["depth"]()), tokens(3, (1, 20))),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (Keep([], [], [], list(range(64))), "invalid layers"),
    (Keep([1, 0], [[0]] * 2, [[0]] * 2, [0]), "invalid layers"),
    (Keep([0], [[0, 2]], [[0]], [0]), "KV heads of layer 0"),
    (Keep([0], [[0]], [[0]], [64]), "hidden channels"),
    (Keep([0, 1], [[0], [0, 1]], [[0], [1]], [0]), "same number"),
    (Keep([0, 1], [[0]], [[0], [1]], [0]), "one list"),
    (Keep([0], [[0, 1]], [[0]], [0], [[0, 1, 2]]), "same number of query heads"),  # 2 heads in group 0, 1 in 1
    (Keep([0], [[0]], [[0]], [0], [[0, 2]]), "outlive its KV group"),  # head 2 is in the dropped group 1
    (Keep([0, 1], [[0, 1]] * 2, [[0]] * 2, [0], [[0, 2], [0, 1, 2, 3]]), "same number of query heads"),
    (Keep([0], [[0, 1]], [[0]], [0], [[2, 0]]), "query heads of layer 0"),
    (Keep([0], [[0, 1]], [[0]], [0], [[0], [1]]), "one list of query heads"),
])
def test_bad_keep_is_refused(bad, match):
    model = make("llama")
    with pytest.raises(SlimlmError, match=match):
        shrink(model, bad)


def test_three_heads_per_group_keep_two_in_each(tmp_path):
    # 6 heads in 2 KV groups of 3 (heads 0-2 | 3-5); keep 2 per group, a different pair in each layer.
    model = make("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    keep = Keep([0, 1, 2], [[0, 1]] * 3, [list(range(128))] * 3, list(range(96)),
                [[0, 1, 3, 5], [1, 2, 3, 4], [0, 2, 4, 5]])
    small = shrink(model, keep)
    ids = tokens(4)
    torch.testing.assert_close(logits(small, ids), logits(masked_reference(model, keep), ids), atol=2e-5, rtol=1e-4)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (4, 2)
    out = write(small, None, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(small, ids), atol=0, rtol=0)
    # q rows of layer 1: heads 1, 2, 3, 4 of 16 rows each; k/v untouched
    torch.testing.assert_close(small.model.layers[1].self_attn.q_proj.weight,
                               model.model.layers[1].self_attn.q_proj.weight[16:80])
    torch.testing.assert_close(small.model.layers[1].self_attn.k_proj.weight,
                               model.model.layers[1].self_attn.k_proj.weight)
