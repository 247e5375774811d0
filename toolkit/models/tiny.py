"""Tiny random models for tests: built from a config in milliseconds, with no download.

The tokenizer is byte-level (one token per UTF-8 byte, plus chat specials), so any text round-trips
and tests need no vocabulary file. Three families cover what the engine must serve:
Llama-style (GQA, tied embeddings), Qwen2-style (attention bias) and Qwen3-style (q/k norm).
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-255 are bytes (GPT-2 byte alphabet), then SPECIALS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the alphabet by the byte each symbol stands for, so id == byte value.
    byte_of = _gpt2_byte_decoder()
    vocab = {ch: byte_of[ch] for ch in alphabet}
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _gpt2_byte_decoder() -> dict[str, int]:
    # GPT-2's reversible map from bytes to printable unicode characters.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


VOCAB = 256 + len(SPECIALS)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=256, eos_token_id=256, pad_token_id=256)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Return `(model, tokenizer)` for a random model of `arch` in {"llama", "qwen2", "qwen3"}.

    `overrides` replace config fields (e.g. `num_hidden_layers=4`). Same seed, same weights.
    """
    cfg = dict(_COMMON)
    if arch == "llama":
        cfg.update(tie_word_embeddings=True)
        cfg.update(overrides)
        config, cls = LlamaConfig(**cfg), LlamaForCausalLM
    elif arch == "qwen2":
        cfg.update(tie_word_embeddings=False)
        cfg.update(overrides)
        config, cls = Qwen2Config(**cfg), Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg.update(tie_word_embeddings=False, head_dim=16)
        cfg.update(overrides)
        config, cls = Qwen3Config(**cfg), Qwen3ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of llama, qwen2, qwen3")
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    return model, byte_tokenizer()
