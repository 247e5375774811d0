"""Importance scores against references computed by hand from the model's pieces, and ranking sanity:
a structure that is switched off scores lowest."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.prune import compute_importance
from slimlm.toolkit.prune.importance import Importance, _Reducer, norm_scales

N, T = 4, 20


def make(arch="llama", **kw):
    model, _ = tiny_model(arch, num_hidden_layers=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def samples(seed=0):
    return torch.randint(0, 256, (N, T), generator=torch.Generator().manual_seed(seed))


def by_hand(model, ids):
    """Walk a Llama forward pass step by step; return the activations the scores are made of."""
    c = model.config
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, 16
    h = model.model.embed_tokens(ids)  # [B, T, H]
    cos, sin = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    acts = {"hidden": [h.abs()], "heads": [], "mlp": [], "block": [], "norm_in": {}}
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(*ids.shape, nh, d).transpose(1, 2)  # [B, nh, T, D]
        k = a.k_proj(x).view(*ids.shape, nkv, d).transpose(1, 2)
        v = a.v_proj(x).view(*ids.shape, nkv, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        w = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        o = (w @ v).transpose(1, 2)  # [B, T, nh, D]
        h2 = h + a.o_proj(o.reshape(*ids.shape, nh * d))
        y = layer.post_attention_layernorm(h2)
        m = F.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y)  # [B, T, I]
        out = h2 + layer.mlp.down_proj(m)
        acts["hidden"] += [x.abs(), y.abs()]
        acts["heads"].append(o.norm(dim=-1))
        acts["mlp"].append(m.abs())
        acts["block"].append((1 - F.cosine_similarity(h, out, dim=-1)).mean())
        acts["norm_in"][f"model.layers.{i}.input_layernorm.weight"] = h
        acts["norm_in"][f"model.layers.{i}.post_attention_layernorm.weight"] = h2
        h = out
    acts["hidden"].append(model.model.norm(h).abs())
    acts["norm_in"]["model.norm.weight"] = h
    acts["logits"] = model.lm_head(model.model.norm(h))
    return acts


def mean_then_l2(x):  # [B, T, C] -> [C]: mean over tokens, L2 over samples (the default aggregation)
    return x.double().mean(1).pow(2).sum(0).sqrt()


def test_activation_scores_match_a_hand_computed_forward():
    model = make()
    ids = samples()
    imp = compute_importance(model, ids, "activation", batch_size=3)  # uneven batches: 3 + 1
    with torch.no_grad():
        ref = by_hand(model, ids)
        torch.testing.assert_close(ref["logits"], model(ids).logits, atol=1e-4, rtol=1e-4)  # the walk is right
    for i in range(3):
        torch.testing.assert_close(imp.heads[i], mean_then_l2(ref["heads"][i]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(imp.mlp[i], mean_then_l2(ref["mlp"][i]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(imp.hidden, sum(mean_then_l2(x) for x in ref["hidden"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(imp.layers, torch.stack(ref["block"]).double(), rtol=1e-4, atol=1e-6)
    assert set(imp.norm_inputs) == set(ref["norm_in"]) and len(imp.norm_inputs) == 7
    for name, x in ref["norm_in"].items():
        torch.testing.assert_close(imp.norm_inputs[name], x.double().pow(2).mean(dim=(0, 1)), rtol=1e-4, atol=1e-9)
    assert imp.groups().shape == (3, 2) and torch.equal(imp.groups(), imp.heads.view(3, 2, 2).sum(-1))


def test_taylor_scores_match_a_full_batch_gradient():
    model = make()
    ids = samples(1)
    imp = compute_importance(model, ids, "taylor", batch_size=3)  # gradient accumulated over 2 batches
    assert all(p.grad is None for p in model.parameters())
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(model(input_ids=ids, labels=ids).loss, list(params.values()))))
    s = {k: (params[k] * grads[k]).abs().double().detach() for k in params}
    for i in range(3):
        p = f"model.layers.{i}."
        mlp = (s[p + "mlp.gate_proj.weight"].sum(1) + s[p + "mlp.up_proj.weight"].sum(1)
               + s[p + "mlp.down_proj.weight"].sum(0))
        heads = (s[p + "self_attn.q_proj.weight"].sum(1).view(4, 16).sum(1)
                 + s[p + "self_attn.o_proj.weight"].sum(0).view(4, 16).sum(1))
        kv = (s[p + "self_attn.k_proj.weight"].sum(1) + s[p + "self_attn.v_proj.weight"].sum(1)).view(2, 16).sum(1)
        torch.testing.assert_close(imp.mlp[i], mlp, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(imp.heads[i], heads, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(imp.groups()[i], kv + heads.view(2, 2).sum(1), rtol=1e-3, atol=1e-9)
    cols = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    hidden = s["model.embed_tokens.weight"].sum(0) + s["model.norm.weight"]  # the tied head shares the embedding
    for i in range(3):
        p = f"model.layers.{i}."
        hidden = hidden + sum(s[p + c + ".weight"].sum(0) for c in cols)
        hidden = hidden + s[p + "self_attn.o_proj.weight"].sum(1) + s[p + "mlp.down_proj.weight"].sum(1)
        hidden = hidden + s[p + "input_layernorm.weight"] + s[p + "post_attention_layernorm.weight"]
    torch.testing.assert_close(imp.hidden, hidden, rtol=1e-3, atol=1e-9)


def switch_off(model, what):
    """Make one structure do nothing: MLP channel 5 of layer 1, KV group 1 of layer 0, hidden channel 7,
    or all of layer 1 (zero o_proj and down_proj: its output equals its input)."""
    with torch.no_grad():
        layers = model.model.layers
        if what == "mlp":
            m = layers[1].mlp
            m.gate_proj.weight[5] = 0
            m.up_proj.weight[5] = 0
            m.down_proj.weight[:, 5] = 0
        elif what == "group":
            a = layers[0].self_attn
            a.q_proj.weight[32:64] = 0  # query heads 2 and 3
            a.k_proj.weight[16:32] = 0
            a.v_proj.weight[16:32] = 0
            a.o_proj.weight[:, 32:64] = 0
        elif what == "hidden":
            model.model.embed_tokens.weight[:, 7] = 0  # nothing writes channel 7: it stays zero
            for layer in layers:
                layer.self_attn.o_proj.weight[7] = 0
                layer.mlp.down_proj.weight[7] = 0
        elif what == "layer":
            layers[1].self_attn.o_proj.weight.zero_()
            layers[1].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("method", ["activation", "taylor"])
def test_a_switched_off_structure_scores_lowest(method):
    for what in ("mlp", "group", "hidden", "layer"):
        model = make()
        switch_off(model, what)
        imp = compute_importance(model, samples(), method, batch_size=4)
        if what == "mlp":
            assert imp.mlp[1].argmin() == 5 and imp.mlp[1, 5] < 1e-9 < imp.mlp[1].sort().values[1]
        elif what == "group":
            assert imp.groups()[0].argmin() == 1 and imp.groups()[0, 1] < 1e-9 < imp.groups()[0, 0]
        elif what == "hidden":
            assert imp.hidden.argmin() == 7 and imp.hidden[7] < 1e-9 < imp.hidden.sort().values[1]
        else:
            assert imp.layers.argmin() == 1 and imp.layers[1] < 1e-6 < imp.layers.sort().values[1]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_scores_have_the_model_shapes(arch):
    model = make(arch)
    for method in ("activation", "taylor"):
        imp = compute_importance(model, samples(), method)
        assert imp.heads.shape == (3, 4) and imp.kv_heads.shape == (3, 2) and imp.mlp.shape == (3, 128)
        assert imp.hidden.shape == (64,) and imp.layers.shape == (3,)
        assert (imp.mlp > 0).all() and (imp.heads > 0).all() and (imp.hidden > 0).all() and (imp.layers > 0).all()


def test_norm_scales_by_hand():
    imp = Importance(*(torch.zeros(1),) * 5, method="activation",
                     norm_inputs={"a": torch.tensor([4.0, 1.0, 1.0, 2.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])})
    # Kept channels 0 and 3 hold mean square (4 + 2) / 2 = 3 against 8 / 4 = 2 over all channels.
    assert norm_scales(imp, [0, 3]) == pytest.approx({"a": 1.5 ** 0.5, "b": 1.0})


def test_aggregation_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 2.0]]])  # [B=2, T=2, C=2]
    r = _Reducer("mean", "l2")
    r.add(x[:1])
    r.add(x[1:])  # streaming over two batches gives the one-batch result
    torch.testing.assert_close(r.result(), torch.tensor([5 ** 0.5, 10 ** 0.5], dtype=torch.float64))
    r = _Reducer("mean", "mean")
    r.add(x)
    torch.testing.assert_close(r.result(), torch.tensor([1.5, 2.0], dtype=torch.float64))
    r = _Reducer("l2", "mean")
    r.add(x)
    want = torch.tensor([(10 ** 0.5 + 2) / 2, (20 ** 0.5 + 2) / 2], dtype=torch.float64)
    torch.testing.assert_close(r.result(), want)


def test_bad_arguments_are_refused():
    model = make()
    with pytest.raises(SlimlmError, match="unknown importance score 'fisher'"):
        compute_importance(model, samples(), "fisher")
    with pytest.raises(SlimlmError, match="unknown token_agg"):
        compute_importance(model, samples(), token_agg="max")
    with pytest.raises(SlimlmError, match=r"\[N, T\]"):
        compute_importance(model, torch.arange(10))
