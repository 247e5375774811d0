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
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
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
    assert llm.engine.block_manager.num_used_blocks == 0


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


def test_n_completions_with_a_seed_are_reproducible_and_distinct():
    model, tok = make()
    llm = LLM(model, tok)
    params = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=10, ignore_eos=True)
    a = llm.generate("hello", params)[0]
    b = llm.generate("hello", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


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


def test_the_preemption_test_really_preempts(monkeypatch):
    from slimlm.serve.engine import scheduler as sched

    count = []
    original = sched.Scheduler._preempt
    monkeypatch.setattr(sched.Scheduler, "_preempt", lambda self, out: count.append(1) or original(self, out))
    test_preemption_keeps_outputs_identical()
    assert count, "the KV cache was big enough that nothing was preempted"
