"""The whole engine on tiny random models: greedy output token-identical to HF generate, at batch 1
and 16, with prefix caching on and off, under preemption; stops, logprobs, n>1 and abort."""
import pytest
import torch

from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "zzzz zzzz zzzz zzzz zzzz zzzz",
           "SYSTEM: be brief. USER: hi", "SYSTEM: be brief. USER: what is 2+2?", "0123456789" * 3,
           "Once upon a time", "x", "fn main() {}", "SYSTEM: be brief. USER: bye", "é ü ß ∑",
           "The capital of France is", "def f(x): return x", "one two three four five", "!"]


def make(arch="llama", seed=0):
    model, tok = tiny_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # wide init: the default 0.02 makes greedy text repeat one token
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt").input_ids
    # eos_token_id=None: past EOS as the engine's ignore_eos goes (min_new_tokens would forbid EOS, another
    # greedy choice wherever EOS is the argmax)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("batch, prefix_caching", [(1, True), (16, True), (16, False)])
def test_greedy_matches_hf_generate(arch, batch, prefix_caching):
    model, tok = make(arch)
    llm = LLM(model, tok, block_size=4, enable_prefix_caching=prefix_caching, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[:3]
    outs = llm.generate(prompts, params) if batch > 1 else [llm.generate(p, params)[0] for p in prompts]
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, tok, prompt, 12), prompt
    assert llm.engine.block_manager.num_used_blocks == 0  # nothing leaked


def test_prefix_cache_is_used_and_lossless():
    model, tok = make()
    llm = LLM(model, tok, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    system = "SYSTEM: you are a helpful assistant, answer briefly. "
    first = llm.generate(system + "USER: hi", params)[0]
    second = llm.generate(system + "USER: hello", params)[0]
    assert second.num_cached_tokens >= 40
    assert second.outputs[0].token_ids == hf_greedy(model, tok, system + "USER: hello", 8)
    assert first.num_cached_tokens == 0


def test_preemption_keeps_outputs_identical():
    model, tok = make()
    # 24 blocks of 4 tokens: 16 prompts of ~20 tokens + 12 new ones cannot all stay resident.
    llm = LLM(model, tok, block_size=4, num_blocks=24, max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [p + " pad pad" for p in PROMPTS]
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, tok, prompt, 12)
        # what the prefix cache gave the prompt when first admitted: a preempted sequence admitted again finds its
        # own KV, outputs included, which is no hit (it was reported, up to 16 tokens past a prompt of 12)
        assert out.num_cached_tokens <= len(out.prompt_token_ids) - 1
    assert llm.engine.block_manager.num_used_blocks == 0


def test_a_preempted_request_reports_only_its_first_admissions_cache_hit():
    model, tok = make()
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_blocks=14, max_model_len=40,
                                                max_num_batched_tokens=64))
    params = SamplingParams(temperature=0, max_tokens=34, ignore_eos=True)
    engine.add_request("a", list(range(10, 16)), params)
    engine.add_request("b", [50, 51], params)
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.stats()["preemptions_total"] > 0  # b ran out of blocks and was computed again
    assert done["a"].num_cached_tokens == done["b"].num_cached_tokens == 0  # nothing was cached when they came


def test_llm_casts_a_loaded_model_to_the_dtype_asked_for():
    model, tok = make()
    llm = LLM(model, tok, dtype="bf16", num_blocks=8)  # was: ignored, the engine served float32
    assert llm.engine.model.dtype == torch.bfloat16 and llm.engine.kv_dtype == torch.bfloat16


def test_llm_takes_token_ids_as_a_tensor_and_refuses_ids_that_are_not_integers():
    model, tok = make()
    llm = LLM(model, tok, num_blocks=16)
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    want = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert llm.generate(torch.tensor([5, 6, 7]), greedy)[0].outputs[0].token_ids == want  # was a RuntimeError
    assert [o.outputs[0].token_ids for o in llm.generate(torch.tensor([[5, 6, 7]] * 2), greedy)] == [want] * 2
    import numpy as np

    assert llm.generate(np.array([5, 6, 7]), greedy)[0].outputs[0].token_ids == want
    assert llm.generate([np.int64(5), np.int64(6), np.int64(7)], greedy)[0].outputs[0].token_ids == want
    for bad in ([[1.5]], torch.tensor([5.0, 6.0])):
        with pytest.raises(ValueError, match="must be integers; got 5.0|must be integers; got 1.5"):  # was run as ids
            llm.generate(bad, greedy)


def test_max_model_len_past_the_models_context_is_refused():
    model, tok = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match="max_model_len 65 is past this model's context of 64 tokens"):
        LLMEngine(model, tok, EngineConfig(max_model_len=65, num_blocks=8))
    assert LLMEngine(model, tok, EngineConfig(max_model_len=64, num_blocks=8)).max_model_len == 64
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "linear", "factor": 2.0}  # stretched
    assert LLMEngine(model, tok, EngineConfig(max_model_len=128, num_blocks=8)).max_model_len == 128


def test_stop_strings_stop_tokens_and_max_tokens():
    model, tok = make()
    llm = LLM(model, tok)
    free = llm.generate("hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop_tok = free.token_ids[5]
    o = llm.generate("hello", SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_tok], ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_tok
    assert o.token_ids == free.token_ids[:free.token_ids.index(stop_tok) + 1]
    stop_str = free.text[8:10]
    if stop_str and "\ufffd" not in stop_str:
        o = llm.generate("hello", SamplingParams(temperature=0, max_tokens=30, stop=[stop_str], ignore_eos=True))[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop_str
        assert o.text == free.text[:free.text.find(stop_str)]


def _published(llm, prompt, params) -> list[str]:
    """The text the engine publishes after each step (what a stream sends), one request, to its end."""
    engine = llm.engine
    engine.add_request("r", llm.tokenizer(prompt).input_ids, params)
    texts = []
    while engine.has_unfinished():
        texts += [o.outputs[0].text for o in engine.step()]
    return texts


def test_a_stream_never_sends_the_start_of_a_stop_string_that_a_later_token_completes():
    model, tok = make("qwen2")  # this tiny model repeats one character, then turns to another
    llm = LLM(model, tok)
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    a = next(i for i in range(1, len(free.text)) if free.text[i] != free.text[i - 1])
    stop = free.text[a - 1:a + 3]  # its first character is the run's: each token of the run may begin it
    assert len(tok.encode(stop, add_special_tokens=False)) > 1 and "\ufffd" not in stop
    texts = _published(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))
    final = free.text[:a - 1]
    assert texts[-1] == final
    assert all(final.startswith(t) for t in texts), texts  # nothing sent that the output then leaves out
    # a stop string begun but never completed is held back only until the end: the output keeps all of it
    never = free.text[-1] + "\x00\x00\x00"
    texts = _published(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop=[never], ignore_eos=True))
    assert texts[-1] == free.text and all(free.text.startswith(t) for t in texts)


def test_logprobs_and_prompt_logprobs_match_hf():
    model, tok = make()
    llm = LLM(model, tok)
    out = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1,
                                                     ignore_eos=True))[0]
    ids = tok("hello world").input_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [T, V]
    P = len(tok("hello world").input_ids)
    assert out.prompt_logprobs[0] is None
    for t in range(1, P):
        assert out.prompt_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
    for i, lp in enumerate(out.outputs[0].logprobs):
        assert lp == pytest.approx(ref[P - 1 + i, ids[P + i]].item(), abs=1e-4)
        assert out.outputs[0].top_logprobs[i][0][0] == ids[P + i]  # greedy: the chosen token is the best


def test_prompt_logprobs_are_computed_for_prompt_chunks_only():
    """A request asking for prompt logprobs computed the LM head over every row of every step of its life (and
    kept decode steps off the CUDA-graph path), its output tokens' rows included, then threw those rows away."""
    model, tok = make()
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)
    whole = LLM(model, tok).generate(prompt, params)[0]
    llm = LLM(model, tok, max_num_batched_tokens=8, max_num_seqs=4, block_size=4)  # the prompt in chunks of 8
    asked = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda out, want=frozenset(): asked.append(bool(want)) or execute(out, want)
    chunked = llm.generate(prompt, params)[0]
    P = len(whole.prompt_token_ids)
    assert asked == [True] * -(-P // 8) + [False] * 5  # the prompt's steps, then 5 decode steps asking nothing
    assert chunked.prompt_logprobs[0] is None
    assert chunked.prompt_logprobs[1:] == pytest.approx(whole.prompt_logprobs[1:], abs=1e-4)
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids


def test_n_completions_with_a_seed_are_reproducible_and_distinct():
    model, tok = make()
    llm = LLM(model, tok)
    params = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=10, ignore_eos=True)
    a = llm.generate("hello", params)[0]
    b = llm.generate("hello", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def computed_tokens(engine):
    """Counts the prompt and output tokens the model computes, over every step of `engine`."""
    seen = []
    execute = engine.runner.execute
    engine.runner.execute = lambda out, *a: seen.append(out.num_batched_tokens) or execute(out, *a)
    return seen


def test_n_completions_share_one_prefill_and_match_greedy():
    model, tok = make()
    llm = LLM(model, tok, block_size=4, enable_prefix_caching=False)
    seen = computed_tokens(llm.engine)
    prompt = "SYSTEM: be brief. USER: what is 2+2?"  # 36 tokens: its last block is partly filled
    out = llm.generate(prompt, SamplingParams(temperature=0, n=4, max_tokens=6, ignore_eos=True))[0]
    want = hf_greedy(model, tok, prompt, 6)
    assert [c.token_ids for c in out.outputs] == [want] * 4
    # One prefill for the four (no prefix cache here), then 5 decode tokens each.
    assert sum(seen) == len(tok(prompt).input_ids) + 4 * 5
    assert llm.engine.block_manager.num_used_blocks == 0


def test_each_completions_first_token_follows_its_own_seed():
    model, tok = make()
    llm = LLM(model, tok)
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=1)
    forked = [c.token_ids for c in llm.generate("hello", params)[0].outputs]
    alone = [llm.generate("hello", SamplingParams(temperature=1.0, seed=5 + i, max_tokens=1))[0].outputs[0].token_ids
             for i in range(3)]
    assert forked == alone
    assert llm.engine.block_manager.num_used_blocks == 0


def test_completions_go_on_when_the_first_one_stops_at_its_first_token():
    model, tok = make()
    llm = LLM(model, tok, block_size=4)
    for seed in range(30):  # a seed whose first completion's first token differs from the others'
        firsts = [c.token_ids[0] for c in llm.generate(
            "hello", SamplingParams(temperature=1.0, n=3, seed=seed, max_tokens=1))[0].outputs]
        if firsts[0] not in firsts[1:]:
            break
    else:
        pytest.fail("no seed in 30 gave a first token the other completions did not also draw")
    params = SamplingParams(temperature=1.0, n=3, seed=seed, max_tokens=5, stop_token_ids=[firsts[0]], ignore_eos=True)
    outs = llm.generate("hello", params)[0].outputs
    assert outs[0].token_ids == [firsts[0]] and outs[0].finish_reason == "stop"
    for c, first in zip(outs[1:], firsts[1:]):
        assert c.token_ids[0] == first and (len(c.token_ids) == 5 or c.finish_reason == "stop")
    assert llm.engine.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_at_once():
    model, tok = make()
    engine = LLMEngine(model, tok, EngineConfig(block_size=4))
    engine.add_request("a", tok("hello world, this is long enough").input_ids, SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("a")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("prompt, words", [([], "empty"), ([1] * 5000, "max_model_len"), ([10**6], "token ids")])
def test_bad_prompts_are_refused(prompt, words):
    model, tok = make()
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=512))
    with pytest.raises(ValueError, match=words):
        engine.add_request("r", prompt, SamplingParams())


def test_a_bad_prompt_or_an_interrupt_leaves_the_llm_usable(monkeypatch):
    """`LLM.generate` with one bad prompt in a batch names it and queues nothing of the batch; an interrupt
    mid-generation leaves no request behind; the next call works and frees its blocks."""
    model, tok = make()
    llm = LLM(model, tok, block_size=4, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt 1: the prompt has 100 tokens"):
        llm.generate([[5, 6], [7] * 100], params)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0
    real_step = llm.engine.step
    calls = []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["hello", "world"], params)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0
    monkeypatch.undo()
    out = llm.generate(["hello", "world"], params)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert llm.engine.block_manager.num_used_blocks == 0


def test_the_preemption_test_really_preempts(monkeypatch):
    from slimlm.serve.engine import scheduler as sched

    count = []
    original = sched.Scheduler._preempt
    monkeypatch.setattr(sched.Scheduler, "_preempt", lambda self, out: count.append(1) or original(self, out))
    test_preemption_keeps_outputs_identical()
    assert count, "the KV cache was big enough that nothing was preempted"


# ---- int8 KV cache -----------------------------------------------------------------------------
# Lossy, so not token-identical to HF by contract: every greedy token must instead be HF's argmax up
# to a small logit margin (teacher-forced on the engine's own output), and the engine's bookkeeping
# (prefix cache, preemption, block reuse) must hold as it does for the float cache.

def assert_near_greedy(model, tok, prompt, tokens, margin=0.1):
    ids = tok(prompt).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens])).logits[0].float()  # [P + T, V]
    for i, t in enumerate(tokens):
        row = logits[len(ids) - 1 + i]
        assert row.max() - row[t] <= margin, (prompt, i, float(row.max() - row[t]))


@pytest.mark.parametrize("arch, prefix_caching", [("llama", True), ("llama", False), ("qwen3", True)])
def test_int8_kv_greedy_stays_near_hf(arch, prefix_caching):
    model, tok = make(arch)
    llm = LLM(model, tok, block_size=4, num_blocks=256, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=64, kv_cache_dtype="int8")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(PROMPTS[:6], params)
    for prompt, out in zip(PROMPTS[:6], outs):
        assert len(out.outputs[0].token_ids) == 8
        assert_near_greedy(model, tok, prompt, out.outputs[0].token_ids)
    if prefix_caching:  # a shared system prompt is served from int8 blocks, scales and all
        system = "SYSTEM: you are a helpful assistant, answer briefly. "
        llm.generate(system + "USER: hi", params)
        second = llm.generate(system + "USER: hello", params)[0]
        assert second.num_cached_tokens >= 40
        assert_near_greedy(model, tok, system + "USER: hello", second.outputs[0].token_ids)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_int8_kv_preemption_and_n_completions(monkeypatch):
    from slimlm.serve.engine import scheduler as sched

    count = []
    original = sched.Scheduler._preempt
    monkeypatch.setattr(sched.Scheduler, "_preempt", lambda self, out: count.append(1) or original(self, out))
    model, tok = make()
    llm = LLM(model, tok, block_size=4, num_blocks=24, max_model_len=96, kv_cache_dtype="int8")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [p + " pad pad" for p in PROMPTS[:12]]
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert_near_greedy(model, tok, prompt, out.outputs[0].token_ids)
    assert count, "nothing was preempted"
    three = llm.generate("hello world", SamplingParams(temperature=0, n=3, max_tokens=8, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in three.outputs}) == 1
    assert llm.engine.block_manager.num_used_blocks == 0


def test_int8_kv_reused_blocks_forget_their_old_scales():
    # Poison every block (huge scales, full-range data) as if a previous owner had written there:
    # reused blocks must restart their scales, so the same request gives the same tokens.
    model, tok = make()
    llm = LLM(model, tok, block_size=4, num_blocks=64, enable_prefix_caching=False, kv_cache_dtype="int8")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    clean = llm.generate(PROMPTS[:4], params)
    for pair in llm.engine.runner.kv_caches:
        for cache in pair:
            cache.data.fill_(127)
            cache.scale.fill_(1e4)
    again = llm.generate(PROMPTS[:4], params)
    for a, b in zip(clean, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-5)


def test_int8_kv_holds_more_blocks_for_the_same_memory():
    model, tok = make()
    cfg = dict(kv_cache_gb=0.002, block_size=16, max_model_len=64)
    fp32 = LLMEngine(model, tok, EngineConfig(**cfg))
    int8 = LLMEngine(model, tok, EngineConfig(**cfg, kv_cache_dtype="int8"))
    a = model.config
    head_dim = a.hidden_size // a.num_attention_heads
    per_head = 16 * head_dim  # int8 data of one block and head; its scale adds 4 bytes
    assert int8.runner.num_blocks / fp32.runner.num_blocks == pytest.approx(4 * per_head / (per_head + 4), rel=0.01)
    assert int8.runner.kv_cache_bytes() <= 0.002 * 2**30
    with pytest.raises(ValueError, match="auto, int8"):
        LLMEngine(model, tok, EngineConfig(kv_cache_dtype="fp8"))
