"""Pruned sizes the serving engine's fast kernels take (hidden and MLP in multiples of 64) and that
transformers loads (Llama: hidden_size a multiple of num_attention_heads), on SmolLM2-135M's real shape
(built on the meta device: no weights, no download) and on tiny models."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimlm.toolkit.export import write
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.prune import count_params, multiples, plan, prune_model, shape_at
from slimlm.toolkit.prune.structure import hidden_needs_heads_divisor

ALL = "heads,mlp,width,depth"


def smollm2_shape():
    """SmolLM2-135M's architecture: 30 layers, hidden 576, 9 heads of 64 in 3 KV groups, MLP 1536, tied."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def loads(model, shape) -> bool:
    """Would transformers save and load a config of this shape (its own validation, nothing else)?"""
    config = LlamaConfig(**{**model.config.to_dict(), **shape.to_dict(), "head_dim": 64})
    config.validate()
    return True


@pytest.fixture(scope="module")
def smol():
    return smollm2_shape()


def test_smollm2_counts_135m_and_needs_heads_to_divide_width(smol):
    assert count_params(smol) == 134_515_008  # what `slimlm prune smollm2-135m` reports before pruning
    assert hidden_needs_heads_divisor(smol.config)
    assert multiples(smol, ALL) == {"mlp": 64, "hidden": 64}


def test_half_of_smollm2_is_kernel_friendly_and_loads(smol):
    # The old rule (multiples of 16, whole KV groups) gave hidden 432 / MLP 1168 (slow path), and with
    # multiple 64 hidden 448 with 6 heads, which transformers refused when the export was written.
    # Now heads and width round together: 6 heads (2 whole groups) with width 384 = 2 x lcm(64, 6).
    p = plan(smol, 0.5, ALL)
    s = p.shape
    assert s.hidden_size % 64 == 0 and s.intermediate_size % 64 == 0
    assert s.hidden_size % s.num_attention_heads == 0 and loads(smol, s)
    assert p.params <= p.target < p.params * 1.06  # coarser widths use the budget a little less well
    assert s.to_dict() == {"num_hidden_layers": 24, "num_attention_heads": 6, "num_key_value_heads": 2,
                           "intermediate_size": 1280, "hidden_size": 384}
    for axes in ("heads:0.2,mlp,width,depth", "heads:3,mlp,width,depth", "heads,mlp,width:0.3"):
        s = plan(smol, 0.5, axes).shape
        assert s.hidden_size % 64 == 0 and s.intermediate_size % 64 == 0 and loads(smol, s), (axes, s)


@pytest.mark.parametrize("axes", [ALL, "heads,mlp,width", "heads,width", "mlp,width:0.5,heads:2,depth"])
def test_every_ratio_gives_kernel_friendly_loadable_shapes(smol, axes):
    for i in range(0, 101):
        s = shape_at(smol, i / 100, axes)
        assert s.hidden_size % 64 == 0 and s.intermediate_size % 64 == 0, (i, s)
        assert s.num_attention_heads % s.num_key_value_heads == 0
        assert s.num_attention_heads // s.num_key_value_heads <= 3
        assert s.hidden_size % s.num_attention_heads == 0, (i, s)


def test_width_without_heads_falls_back_to_a_multiple_of_the_heads(smol):
    # 9 heads stay, so every width is a multiple of 9: lcm(64, 9) = 576 leaves nothing to prune; the
    # largest power-of-two fraction of 64 leaving 4 widths is 16 -> multiples of 144.
    assert multiples(smol, "mlp,width") == {"mlp": 64, "hidden": 144}
    p = plan(smol, 0.5, "mlp,width")
    assert p.shape.hidden_size % 144 == 0 and p.shape.intermediate_size % 64 == 0 and loads(smol, p.shape)
    assert p.shape.num_attention_heads == 9


def test_explicit_multiple_is_honoured(smol):
    p = plan(smol, 0.5, ALL, multiple=16)
    assert p.shape.hidden_size % 16 == 0 and p.shape.intermediate_size % 16 == 0
    assert p.shape.hidden_size % p.shape.num_attention_heads == 0 and loads(smol, p.shape)
    p = plan(smol, 0.5, ALL, multiple=128)
    assert p.shape.hidden_size % 128 == 0 and p.shape.intermediate_size % 128 == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("target", [0.4, 0.55, 0.7])
def test_tiny_gqa_models_prune_and_reload(arch, target, tmp_path):
    # 6 heads in 2 groups of 3, hidden 96 (head_dim 16): the default multiple falls back to 16 for width
    # and 32 for the MLP; every planned export must load with plain transformers.
    model, _ = tiny_model(arch, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                          head_dim=16, intermediate_size=128)
    assert multiples(model, ALL) == {"mlp": 32, "hidden": 16}
    samples = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    small, report = prune_model(model, samples, target=target, axes=ALL)
    after = report["shape_after"]
    assert report["params_after"] <= report["target_params"] and report["multiples"] == {"mlp": 32, "hidden": 16}
    assert after["hidden_size"] % 16 == 0 and after["intermediate_size"] % 32 == 0
    out = write(small, None, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == after["num_attention_heads"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = samples[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, small(input_ids=ids).logits, atol=0, rtol=0)
