"""The LM head quantized into the GPTQ export: untied, RTN codes, `lm_head: true` with a `dynamic` override,
read back by `load_gptq`; and its refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import read
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant.calibrate import quantize_model
from slimlm.toolkit.quant.gptq_format import load_gptq, quantization_config, read_gptq_tensors, save_gptq
from slimlm.toolkit.quant.lm_head import head_scheme, quantize_lm_head
from slimlm.toolkit.quant.rtn import rtn_quantize
from slimlm.toolkit.quant.scheme import QuantScheme

VOCAB = 264  # the byte tokenizer's 259 ids padded to a multiple of 8 (GPTQ packs the head's outputs 8 or 4 a word)


def tiny(arch="llama"):
    return tiny_model(arch, seed=0, vocab_size=VOCAB, initializer_range=0.3)


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("int4", 4)])
def test_a_tied_head_is_untied_and_holds_its_rtn_codes(kind, bits):
    model, _ = tiny()
    embed = model.get_input_embeddings().weight
    dense = embed.detach().clone()
    scheme = head_scheme(QuantScheme(bits=4, group_size=32, sym=False, act_order=True), kind)
    assert (scheme.bits, scheme.group_size, scheme.act_order) == (bits, 32, False)
    qw = quantize_lm_head(model, scheme)
    head = model.lm_head.weight
    assert head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    assert torch.equal(embed, dense)  # the embedding keeps the dense matrix
    assert torch.equal(head, rtn_quantize(dense, scheme).dequantize()) and torch.equal(head, qw.dequantize())
    assert not torch.equal(head, dense)
    assert model.config.tie_word_embeddings is False
    assert int(qw.codes.max()) <= (1 << bits) - 1


def test_the_export_carries_the_quantized_head_and_loads_back_exactly(tmp_path):
    model, tok = tiny()
    body = QuantScheme(bits=4, group_size=32, sym=True)
    head = head_scheme(body, "int8")
    state = quantize_model(model, body, "rtn", progress=False)
    state["lm_head"] = quantize_lm_head(model, head)
    folder = save_gptq(model, tok, state, body, tmp_path / "q", lm_head_scheme=head)

    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["lm_head"] is True and qc["bits"] == 4
    assert qc["dynamic"] == {"+:^lm_head$": {"bits": 8, "group_size": 32}}
    assert config["tie_word_embeddings"] is False
    packed = read_gptq_tensors(folder)["lm_head"]
    assert packed["qweight"].shape == (64 * 8 // 32, VOCAB)  # 8-bit codes, 4 per int32, along the inputs
    assert packed["scales"].shape == (64 // 32, VOCAB)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    assert read(folder).transforms["quant"]["lm_head"]["bits"] == 8

    loaded, _ = load_gptq(folder)
    assert torch.equal(loaded.lm_head.weight, state["lm_head"].dequantize())
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.half().float())
    layer = "model.layers.1.mlp.down_proj"
    assert torch.equal(loaded.get_submodule(layer).weight, state[layer].dequantize())


def test_a_head_at_the_body_s_bits_needs_no_override():
    body = QuantScheme(bits=8, group_size=64)
    qc = quantization_config(body, head=head_scheme(body, "int8"))
    assert qc["lm_head"] is True and "dynamic" not in qc
    assert quantization_config(body)["lm_head"] is False


def test_head_and_scheme_go_together(tmp_path):
    model, tok = tiny()
    body = QuantScheme(bits=4, group_size=32)
    state = quantize_model(model, body, "rtn", progress=False)
    with pytest.raises(SlimlmError, match="go together"):
        save_gptq(model, tok, state, body, tmp_path / "a", lm_head_scheme=head_scheme(body, "int8"))
    state["lm_head"] = quantize_lm_head(model, head_scheme(body, "int8"))
    with pytest.raises(SlimlmError, match="go together"):
        save_gptq(model, tok, state, body, tmp_path / "b")


def test_refusals():
    with pytest.raises(SlimlmError, match="int8, int4"):
        head_scheme(QuantScheme(), "int2")
    model, _ = tiny_model("llama", seed=0)  # 259 outputs: not a multiple of 8 codes per int32
    with pytest.raises(SlimlmError, match="lm_head has out_features=259"):
        quantize_lm_head(model, head_scheme(QuantScheme(bits=4, group_size=32), "int4"))
    assert model.config.tie_word_embeddings is True  # refused before anything changed
