"""slimlm's CausalLM against transformers on tiny random models: prefill, chunked prefill + decode, greedy."""
import random

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.layers import rope_inv_freq
from slimlm.serve.models import CausalLM, load_model
from slimlm.toolkit.models import byte_tokenizer, tiny_model

ARCHS = ["llama", "qwen2", "qwen3"]
# Larger than the default 0.02 init: logits spread over a few units, so greedy text varies
# instead of repeating one token, and a wrong attention weight moves the logits visibly.
INIT = 0.3
SMALL = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=8192)
BLOCK = 4


class Pool:
    """The smallest block allocator: shuffled free ids, so a sequence's blocks are never contiguous."""

    def __init__(self, num_blocks, seed=0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables = {}

    def grow(self, seq, length):
        table = self.tables.setdefault(seq, [])
        while len(table) * BLOCK < length:
            table.append(self.free.pop())
        return table


def run_step(model, caches, pool, chunks):
    """One engine step. chunks: [(seq_id, tokens already cached, new token ids)] -> hidden [N, hidden], meta."""
    ids, positions, q_lens, s_lens, tables = [], [], [], [], []
    for seq, cached, new in chunks:
        ids += new
        positions += range(cached, cached + len(new))
        q_lens.append(len(new))
        s_lens.append(cached + len(new))
        tables.append(pool.grow(seq, cached + len(new)))
    meta = AttentionMetadata.build(q_lens, s_lens, tables, BLOCK)
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.tensor(positions), caches, meta)
    return hidden, meta


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    hf, _ = tiny_model(request.param, seed=0, initializer_range=INIT)
    return hf, load_model(hf)


def test_prefill_logits_match_hf(pair):
    hf, model = pair
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    hidden, _ = run_step(model, model.allocate_kv_cache(16, BLOCK), Pool(16), [(0, 0, ids)])
    with torch.no_grad():
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def mixed_schedule_logits(model, caches):
    """Three sequences of different lengths share every step: prompts arrive in 2-3 chunks while the
    others already decode. Returns the sequences and each one's logits [len, V] at every position."""
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (30, 14, 24)]
    schedule = [  # new tokens per sequence per step; then one each (decode) until a sequence is done
        [10, 9, 4],  # prompts of 23, 9 and 16 tokens: chunk 1 (sequence 1 whole)
        [8, 1, 7],   # chunk 2 beside sequence 1's first decode step
        [5, 1, 5],   # last chunks
    ]
    pool = Pool(40, seed=3)
    done = [0, 0, 0]
    got = [[] for _ in seqs]
    steps_seen = set()
    while any(d < len(s) for d, s in zip(done, seqs)):
        plan = schedule.pop(0) if schedule else [1, 1, 1]
        chunks = [(i, done[i], seqs[i][done[i]:done[i] + n]) for i, n in enumerate(plan)
                  if n and done[i] < len(seqs[i])]
        hidden, meta = run_step(model, caches, pool, chunks)
        steps_seen.add(tuple(meta.query_lens))
        with torch.no_grad():
            logits = model.compute_logits(hidden)
        starts = meta.query_start_loc.tolist()
        for j, (i, _, new) in enumerate(chunks):
            got[i].append(logits[starts[j]:starts[j + 1]])
            done[i] += len(new)
    assert (8, 1, 7) in steps_seen and (1, 1, 1) in steps_seen  # mixed steps and decode-only steps ran
    return seqs, [torch.cat(parts) for parts in got]


def test_chunked_prefill_and_decode_in_one_batch_match_hf(pair):
    # Every new token's logits must equal HF's at that position.
    hf, model = pair
    seqs, got = mixed_schedule_logits(model, model.allocate_kv_cache(40, BLOCK))
    for seq, logits in zip(seqs, got):
        torch.testing.assert_close(logits, hf_logits(hf, seq), atol=1e-4, rtol=1e-4)


def test_int8_kv_cache_stays_close_to_hf(pair):
    # The same schedule over an int8 cache: logits off by a small fraction of their spread (these
    # random models with wide weights amplify noise more than trained ones: ~2% on average here).
    hf, model = pair
    caches = model.allocate_kv_cache(40, BLOCK, dtype=torch.int8)
    assert type(caches[0][0]).__name__ == "QuantizedKV"
    seqs, got = mixed_schedule_logits(model, caches)
    for seq, logits in zip(seqs, got):
        ref = hf_logits(hf, seq)
        err = (logits - ref).abs() / ref.std()
        assert 0 < err.mean() < 0.04 and err.max() < 0.35, (err.mean(), err.max())


def test_kv_cache_dtypes_and_block_bytes(pair):
    _, model = pair
    a = model.args
    elems = 2 * a.num_layers * BLOCK * a.num_kv_heads * a.head_dim
    assert model.kv_cache_block_bytes(BLOCK) == elems * 4  # fp32 model
    assert model.kv_cache_block_bytes(BLOCK, torch.int8) == elems + 2 * a.num_layers * a.num_kv_heads * 4
    (k, v), = model.allocate_kv_cache(3, BLOCK, dtype=torch.int8)[:1]
    assert k.data.dtype == torch.int8 and k.scale.shape == (3, a.num_kv_heads) and k.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="int8"):
        model.allocate_kv_cache(3, BLOCK, dtype=torch.int16)


def greedy(model, prompts, steps):
    """Greedy decoding of several prompts in one flattened batch; logits only for each last token."""
    pool = Pool(64, seed=5)
    caches = model.allocate_kv_cache(64, BLOCK)
    seqs = [list(p) for p in prompts]
    cached = [0] * len(seqs)
    for _ in range(steps):
        chunks = [(i, cached[i], s[cached[i]:]) for i, s in enumerate(seqs)]
        hidden, meta = run_step(model, caches, pool, chunks)
        with torch.no_grad():
            next_ids = model.compute_logits(hidden[meta.last_token_indices]).argmax(-1).tolist()
        for i, t in enumerate(next_ids):
            cached[i] = len(seqs[i])
            seqs[i].append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_greedy_generation_matches_hf_generate(pair):
    hf, model = pair
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 12)]
    ours = greedy(model, prompts, 20)
    for prompt, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(set(ref)) > 3, "reference text degenerate: the test would prove little"
        assert out == ref


def test_first_layers_only_equal_hf_hidden_states():
    # The early-exit seam: after E layers, forward returns HF's hidden_states[E] (pre final norm).
    hf, _ = tiny_model("llama", seed=0, initializer_range=INIT, num_hidden_layers=3)
    model = load_model(hf)
    ids = list(range(40, 60))
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for e in (0, 1, 2):
        caches = model.allocate_kv_cache(8, BLOCK)
        meta = AttentionMetadata.build([20], [20], [Pool(8).grow(0, 20)], BLOCK)
        with torch.no_grad():
            hidden = model(torch.tensor(ids), torch.arange(20), caches[:e], meta, num_layers=e)
        torch.testing.assert_close(hidden, states[e][0], atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_hf():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf, _ = tiny_model("llama", seed=0, initializer_range=INIT, rope_parameters=rope)
    model = load_model(hf)
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert not torch.allclose(model.rotary.inv_freq, unscaled)  # the scaling did something
    torch.testing.assert_close(model.rotary.inv_freq, hf.model.rotary_emb.inv_freq.float())
    ids = list(range(100, 160))
    hidden, _ = run_step(model, model.allocate_kv_cache(16, BLOCK), Pool(16), [(0, 0, ids)])
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(hidden), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_mistral_loads_and_matches_hf():
    config = MistralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                           max_position_embeddings=8192, initializer_range=INIT, sliding_window=None)
    torch.manual_seed(0)
    hf = MistralForCausalLM(config).eval()
    model = load_model(hf)
    assert model.args.head_dim == 24 and not model.args.tie_word_embeddings
    ids = list(range(30))
    hidden, _ = run_step(model, model.allocate_kv_cache(16, BLOCK), Pool(16), [(0, 0, ids)])
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(hidden), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_swish_is_silu_and_other_activations_are_refused():
    hf = MistralForCausalLM(MistralConfig(**SMALL, hidden_act="swish", sliding_window=None,
                                          initializer_range=INIT)).eval()
    model = load_model(hf)
    ids = list(range(20))
    hidden, _ = run_step(model, model.allocate_kv_cache(16, BLOCK), Pool(16), [(0, 0, ids)])
    with torch.no_grad():
        torch.testing.assert_close(model.compute_logits(hidden), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        load_model(MistralForCausalLM(MistralConfig(**SMALL, hidden_act="gelu", sliding_window=None)))


@pytest.mark.parametrize("make, window", [
    (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8)), 8),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1)), 8),
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8)), None),  # none slides
    (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, sliding_window=8)), None),
    (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)), None),
    (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8192)), None),  # no shorter than the context
])
def test_a_sliding_window_caps_the_engines_context(make, window):
    # The runtime attends to the whole context, which is the model's windowed attention only up to the window:
    # the engine's max model length stops there by default, and a longer one is refused, not served wrongly.
    from slimlm.serve.engine.engine import EngineConfig, LLMEngine

    hf = make().eval()
    assert load_model(hf).args.sliding_window == window
    engine = LLMEngine(hf, byte_tokenizer(), EngineConfig(num_blocks=8))
    assert engine.max_model_len == (window or 4096)
    if window:
        with pytest.raises(ValueError, match="past this model's sliding window of 8 tokens"):
            LLMEngine(hf, byte_tokenizer(), EngineConfig(num_blocks=8, max_model_len=9))


def test_from_state_dict_and_fused_shapes():
    hf, _ = tiny_model("qwen2", seed=0)
    model = CausalLM.from_hf(hf.state_dict(), hf.config)
    layer = model.layers[0]
    c = hf.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert layer.qkv_proj.weight.shape == (c.hidden_size + 2 * kv, c.hidden_size)
    assert layer.qkv_proj.bias.shape == (c.hidden_size + 2 * kv,)
    assert layer.gate_up_proj.weight.shape == (2 * c.intermediate_size, c.hidden_size)
    with pytest.raises(ValueError, match="config"):
        CausalLM.from_hf(hf.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embeddings_are_held_once(monkeypatch, dtype):
    # Plain dense heads share the embedding tensor; a packed head whose layout the lookup can read serves the
    # lookup from its packed rows, so the matrix is held once (not a dense copy beside the packed one), and the
    # model computes exactly what the dense one does.
    hf, _ = tiny_model("llama", seed=0, vocab_size=320)  # 320 rows: the bf16 kernel's layout (64-row blocks)
    monkeypatch.setenv("SLIMLM_PACK_LINEAR", "0")
    model = load_model(hf, dtype=dtype)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.data_ptr()
    monkeypatch.setenv("SLIMLM_PACK_LINEAR", "1")
    packed = load_model(hf, dtype=dtype)
    torch.testing.assert_close(packed.lm_head.weight, packed.embed_tokens, atol=0, rtol=0)
    ids = torch.tensor([0, 319, 64, 7, 7, 200])
    assert torch.equal(packed.embed(ids), model.embed(ids))
    if getattr(packed.lm_head, "own_layout", False):  # bf16 without AVX-512: slimlm's layout, always readable
        assert packed.lm_head.has_rows
    if getattr(packed.lm_head, "has_rows", False):
        assert packed.embed_weight is None  # one copy
        assert all(p.numel() != 320 * 64 for p in packed.parameters())
        head = packed.lm_head
        packed.lm_head = torch.nn.Identity()  # a head replaced later (--quantize-lm-head) keeps the lookup
        assert torch.equal(packed.embed(ids), model.embed(ids))
        packed.lm_head = head


def test_bf16_stays_close_to_hf_bf16():
    hf, _ = tiny_model("qwen3", seed=0, initializer_range=INIT)
    model = load_model(hf, dtype=torch.bfloat16)
    ids = list(range(50, 80))
    hidden, _ = run_step(model, model.allocate_kv_cache(16, BLOCK), Pool(16), [(0, 0, ids)])
    with torch.no_grad():
        ours = model.compute_logits(hidden).float()
    ref = hf_logits(hf.to(torch.bfloat16), ids).float()
    hf.float()
    assert hidden.dtype == torch.bfloat16
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(ours, ref, atol=0.15, rtol=0.05)


def test_unsupported_model_type_is_a_clear_error():
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="gpt2.*supported: llama, mistral, qwen2, qwen3"):
        load_model(hf)


def test_unsupported_rope_type_is_a_clear_error():
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}
    hf, _ = tiny_model("llama", seed=0, rope_parameters=rope)
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        load_model(hf)


def test_rope_frequencies_follow_the_module():
    # `hf.to(torch.bfloat16)` rounds transformers' inv_freq buffer to bf16 and HF's RoPE then uses the
    # rounded frequencies: ours must too, or every position differs from the bf16 reference.
    hf, _ = tiny_model("llama", seed=0, initializer_range=INIT)
    hf_bf16 = hf.to(torch.bfloat16)
    model = load_model(hf_bf16)
    torch.testing.assert_close(model.rotary.inv_freq, hf_bf16.model.rotary_emb.inv_freq.float(), atol=0, rtol=0)
    assert not torch.equal(model.rotary.inv_freq, rope_inv_freq(16, hf.config.rope_parameters))
    hf.float()
