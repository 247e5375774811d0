import torch

from slimlm.toolkit.models import byte_tokenizer, tiny_model


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "héllo\nwörld ✓ <|im_end|> tabs\tand  spaces"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert ids[:2] == [ord("h"), 0xC3]  # ids are byte values
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_tiny_models_are_deterministic_and_distinct():
    for arch in ("llama", "qwen2", "qwen3"):
        a, _ = tiny_model(arch, seed=1)
        b, _ = tiny_model(arch, seed=1)
        c, _ = tiny_model(arch, seed=2)
        x = torch.tensor([[1, 2, 3, 4]])
        assert torch.equal(a(x).logits, b(x).logits)
        assert not torch.equal(a(x).logits, c(x).logits)


def test_tiny_families_have_their_features():
    llama, _ = tiny_model("llama")
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads  # GQA
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # tied
    qwen2, _ = tiny_model("qwen2")
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    qwen3, _ = tiny_model("qwen3")
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")
