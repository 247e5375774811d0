"""The opt-in quantized LM head: the output projection becomes an RTN int4/int8 QuantLinear whose
logits follow the dense head's, the embedding lookup keeps the dense matrix, and the engine uses it."""
import pytest
import torch

from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.layers.quant_linear import QuantLinear
from slimlm.serve.models import load_model
from slimlm.serve.models.quant_head import head_error, quantize_lm_head
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant.rtn import rtn_dequantize
from slimlm.toolkit.quant.scheme import QuantScheme

torch.set_num_threads(1)


@pytest.mark.parametrize("kind,bits,bound", [("int8", 8, 0.01), ("int4", 4, 0.15)])
@pytest.mark.parametrize("hidden", [64, 48])  # 48: 64 does not divide it, one group per row
def test_head_is_the_rtn_quantization_of_the_dense_head(kind, bits, bound, hidden):
    hf, _ = tiny_model("llama", hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                       initializer_range=0.3)
    model = load_model(hf)
    dense = model.lm_head.weight.detach().clone()
    embed = model.embed_tokens.detach().clone()
    head = quantize_lm_head(model, kind)
    assert isinstance(model.lm_head, QuantLinear) and head is model.lm_head and head.bits == bits
    gs = 64 if hidden % 64 == 0 else -1
    expected = rtn_dequantize(dense.float(), QuantScheme(bits=bits, group_size=gs, sym=False, scale_dtype="bfloat16"))
    assert torch.equal(head.dequantize(), expected)  # exactly the RTN weight, nothing else
    assert torch.equal(model.embed_tokens, embed)   # the lookup still reads the unquantized matrix
    ids = torch.arange(hf.config.vocab_size)
    assert torch.equal(model.embed(ids), embed[ids])
    hidden_states = torch.randn(8, hidden)
    err = head_error(dense, head, hidden_states)
    assert 0 < err < bound


def test_engine_serves_with_a_quantized_head():
    hf, tok = tiny_model("llama", initializer_range=0.3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def generate(cfg):
        engine = LLMEngine(hf, tok, cfg)
        engine.add_request("a", [5, 17, 99, 3, 42], params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    return engine, out.outputs[0].token_ids

    engine, tokens = generate(EngineConfig(num_blocks=32, quantize_lm_head="int8"))
    assert isinstance(engine.model.lm_head, QuantLinear)
    _, dense_tokens = generate(EngineConfig(num_blocks=32))
    assert len(tokens) == 12
    # int8 RTN moves these logits by ~0.04 (of ~8): the first token, whose top-2 gap is 0.85, is kept
    # (later steps of this random model have gaps of 0.01, where either token is a fair greedy pick)
    assert tokens[0] == dense_tokens[0]


def test_bad_kind_is_named():
    hf, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="int4, int8"):
        quantize_lm_head(load_model(hf), "int3")
