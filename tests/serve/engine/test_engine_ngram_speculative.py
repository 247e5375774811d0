"""Prompt-lookup speculative decoding: the n-gram index proposes what followed the latest earlier occurrence
of the longest suffix; greedy output equals plain decoding at batch 1 and 16, in mixed steps (sequences
without a draft ride in the verify pass) and under memory pressure; sampled tokens keep the target's
distribution; bad configurations are refused."""
import random

import pytest
import torch

from slimlm.serve.engine.ngram_speculative import NgramIndex, NgramSpeculator
from slimlm.serve.engine.speculative import SpeculativeConfig
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world hello world hello", "the quick brown fox jumps over the quick brown", "a",
           "zzzz zzzz zzzz zzzz zzzz zzzz", "SYSTEM: be brief. USER: hi", "0123456789" * 3, "Once upon a time",
           "x", "fn main() {} fn main() {}", "SYSTEM: be brief. USER: bye", "abc abd abc abd ab", "é ü ß ∑ é ü",
           "The capital of France is", "def f(x): return x", "one two three one two three one", "!"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings on one thread


def make(seed=0, layers=3):
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def run(model, tok, prompts, spec=None, params=GREEDY, **config):
    llm = LLM(model, tok, block_size=4, max_num_batched_tokens=64, speculative=spec, **config)
    outs = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_used_blocks == 0  # nothing leaked
    return [o.outputs[0].token_ids for o in outs], llm.engine


def _brute_force(tokens, k, lo, hi):
    for n in range(min(hi, len(tokens)), lo - 1, -1):
        suffix = tokens[-n:]
        for at in range(len(tokens) - 1, n - 1, -1):  # latest occurrence ending before the last token
            if tokens[at - n:at] == suffix:
                return tokens[at:at + k]
    return []


def test_the_index_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    index = NgramIndex(1, 3)
    assert index.propose([5, 6, 7, 1, 2, 9, 1, 2], 3) == [9, 1, 2]  # (1, 2) last seen before 9
    index = NgramIndex(2, 3)
    # (7, 1, 2) beats the later (1, 2): the longest suffix wins
    assert index.propose([7, 1, 2, 3, 4, 1, 2, 8, 7, 1, 2], 2) == [3, 4]
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert NgramIndex(1, 1).propose([3, 3, 3], 5) == [3]  # a loop: the token after the latest 3 that had one


def test_the_incremental_index_equals_a_search_of_the_whole_text():
    rng = random.Random(0)
    for lo, hi in [(1, 3), (2, 4), (3, 3)]:
        tokens, index = [rng.randrange(6) for _ in range(3)], NgramIndex(lo, hi)
        for _ in range(300):
            k = rng.randrange(1, 6)
            assert index.propose(tokens, k) == _brute_force(tokens, k, lo, hi), (tokens, lo, hi)
            tokens += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]  # a step appends 1 + accepted


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("lookup, num_draft, adaptive", [(2, 3, False), (4, 6, False), (3, 4, True)])
def test_greedy_output_equals_plain_decoding(batch, lookup, num_draft, adaptive):
    model, tok = make()
    plain, _ = run(model, tok, PROMPTS[:batch])
    spec = SpeculativeConfig(prompt_lookup=lookup, prompt_lookup_min=1, num_draft=num_draft, adaptive=adaptive,
                             verify_cost=0.01)  # adaptive: rows priced cheap until timed, so it drafts
    fast, engine = run(model, tok, PROMPTS[:batch], spec)
    assert isinstance(engine.speculator, NgramSpeculator)
    assert fast == plain
    st = engine.speculator.stats
    assert st.steps > 0 and 0 < st.accepted <= st.drafted  # drafted, and some drafts were kept


def test_sequences_without_a_draft_ride_in_the_verify_pass(monkeypatch):
    model, tok = make()
    plans = []
    plan = NgramSpeculator.plan

    def spy(self, *args):
        ks = plan(self, *args)
        plans.append(dict(ks))
        return ks

    monkeypatch.setattr(NgramSpeculator, "plan", spy)
    plain, _ = run(model, tok, PROMPTS[:8])
    fast, engine = run(model, tok, PROMPTS[:8], SpeculativeConfig(prompt_lookup=3, num_draft=4, adaptive=False))
    assert fast == plain
    mixed = [p for p in plans if p and 0 in p.values() and max(p.values()) > 0]
    assert mixed  # a step verified some sequences' drafts and decoded the others in the same pass
    assert engine.speculator.stats.steps == sum(1 for p in plans for k in p.values() if k)


def test_exact_under_memory_pressure_and_prefix_sharing():
    model, tok = make(seed=2)
    prompts = PROMPTS + ["SYSTEM: be brief. USER: " + p for p in PROMPTS[:4]]
    plain, _ = run(model, tok, prompts, num_blocks=48, max_model_len=96)
    spec = SpeculativeConfig(prompt_lookup=3, prompt_lookup_min=1, num_draft=5, adaptive=False)
    fast, engine = run(model, tok, prompts, spec, num_blocks=48, max_model_len=96)
    assert fast == plain
    assert engine.speculator.stats.steps > 0


def test_logprob_requests_decode_plainly_and_sampled_ones_speculate_reproducibly():
    model, tok = make()
    spec = SpeculativeConfig(prompt_lookup=3, prompt_lookup_min=1, num_draft=3, adaptive=False)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    plain, _ = run(model, tok, PROMPTS[:2], params=params)
    fast, engine = run(model, tok, PROMPTS[:2], spec, params=params)
    assert fast == plain and engine.speculator.stats.steps == 0
    sampled = SamplingParams(temperature=0.3, max_tokens=20, ignore_eos=True)  # unseeded: a seed decodes plainly
    torch.manual_seed(3)
    fast, engine = run(model, tok, PROMPTS[:3], spec, params=sampled)
    assert engine.speculator.stats.steps > 0 and all(len(t) == 20 for t in fast)
    torch.manual_seed(3)
    again, _ = run(model, tok, PROMPTS[:3], spec, params=sampled)
    assert again == fast  # the same draws from the default generator, the same text


@pytest.mark.parametrize("adaptive", [True, False])
def test_seeded_sampled_requests_decode_plainly(adaptive):
    # Whether and how far a step drafts follows timings and the batch (with fixed drafting too: the batch
    # limit, free KV blocks), and it changes how many numbers a request's generator draws: a seeded request
    # would not repeat its text. It decodes plainly, so its text is the plain engine's.
    model, tok = make()
    spec = SpeculativeConfig(prompt_lookup=3, prompt_lookup_min=1, num_draft=3, verify_cost=0.01, adaptive=adaptive)
    seeded = SamplingParams(temperature=0.5, max_tokens=20, seed=5, ignore_eos=True)
    plain, _ = run(model, tok, PROMPTS[:4], params=seeded)
    fast, engine = run(model, tok, PROMPTS[:4], spec, params=seeded)
    assert fast == plain and engine.speculator.stats.steps == 0
    unseeded = SamplingParams(temperature=0.5, max_tokens=20, ignore_eos=True)
    _, engine = run(model, tok, PROMPTS[:4], spec, params=unseeded)
    assert engine.speculator.stats.steps > 0  # sampled requests do speculate


def test_the_acceptance_rule_with_a_certain_draft_keeps_the_target_distribution():
    # Draft d_1 = 0 and d_2 = 1 against target distributions p_1, p_2, p_3: the first emitted token must follow
    # p_1, and the second, given that d_1 was kept, p_2 (kept with p(d), else p without d, renormalised).
    model, tok = make()
    spec = NgramSpeculator(LLM(model, tok, block_size=4, num_blocks=16).engine.model,
                           SpeculativeConfig(prompt_lookup=2))
    gen = torch.Generator().manual_seed(0)
    spec.generator_for = lambda sid: gen
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
    n = 20000
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        out = spec._accept_sampled(0, [0, 1], p)
        first[out[0]] += 1
        if out[0] == 0:
            second[out[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        expected = counts.sum() * probs
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 16.3, (counts, probs)  # chi-square, 3 degrees of freedom: p = 0.001
    # accepting every draft as it is would give token 0 first every time
    assert first[0] < 0.55 * n


def test_bad_configs_are_refused(tmp_path):
    model, tok = make()
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        LLM(model, tok, block_size=4, num_blocks=16, speculative=SpeculativeConfig(prompt_lookup=2, prompt_lookup_min=3))
    with pytest.raises(ValueError, match="exit_confidence"):
        LLM(model, tok, block_size=4, num_blocks=16, speculative=SpeculativeConfig(prompt_lookup=2, exit_confidence=0.9))


def _policy(**config):
    model, tok = make()
    return NgramSpeculator(LLM(model, tok, block_size=4, num_blocks=16).engine.model,
                           SpeculativeConfig(prompt_lookup=3, **config))


def test_the_policy_verifies_the_likeliest_tokens_while_rows_pay_for_themselves():
    spec = _policy(num_draft=4)
    found = {1: [7, 8, 9], 2: [5, 6, 7]}
    assert spec.choose(found, 2) == {}  # no plain step of 2 sequences timed yet: decode plainly to time one
    spec.observe(0.010, batch=1, k=0)
    spec.observe(0.020, batch=2, k=0)
    spec.rows_time[4] = 0.024  # verifying 3 drafts at batch 1 took 2.4 plain steps...
    spec.acceptance.update({1: 0.9, 2: 0.9})
    assert spec.choose({1: [7, 8, 9]}, 1) == {1: 3}  # ...and 90% acceptance emits 3.4 tokens: 1.4x
    spec.acceptance[1] = 0.3
    assert spec.choose({1: [7, 8, 9]}, 1) == {}  # 30%: 1.4 tokens for 2.4 steps' time at most
    # At batch 2, rows are priced from the per-row cost seen nearest (5 rows: 1.5 ms a row over the plain
    # step): the more likely sequence gets its tokens first, a prefix of its draft each.
    for five_rows, drafts in ((0.0245, True), (0.060, False)):  # the second: rows this dear never pay
        spec = _policy(num_draft=4)
        spec.observe(0.020, batch=2, k=0)
        spec.rows_time[5] = five_rows
        spec.acceptance.update({1: 0.95, 2: 0.5})
        ks = spec.choose(found, 2)
        assert (ks[1] == 3 and ks.get(2, 0) < 3) if drafts else not ks


def test_a_sequence_kept_from_drafting_probes_now_and_then():
    spec = _policy(num_draft=4, probe_every=3)
    spec.observe(0.010, batch=1, k=0)
    spec.rows_time[2] = 0.030
    spec.acceptance[1] = 0.1
    picks = [spec.choose({1: [4, 5]}, 1) for _ in range(12)]
    assert picks.count({1: 1}) == 2 and picks[2] == {1: 1}  # after 3 steps, then after 6 more (the wait doubled)


def test_timed_steps_go_by_rows_and_mixed_passes_are_not_timed():
    from types import SimpleNamespace

    spec = _policy()
    out = SimpleNamespace(scheduled=[SimpleNamespace(seq=SimpleNamespace(seq_id=i)) for i in range(3)])
    spec.observe_step(0.030, out, {})
    spec.observe_step(0.050, out, {0: 2, 1: 0, 2: 1})  # 3 sequences, 6 rows in one pass
    spec.observe_step(0.900, out, {0: 2, 1: 0})  # a third sequence decoded in a pass of its own: not clean
    assert spec.plain_time == {3: 0.030} and spec.rows_time == {6: 0.050}
    assert spec.step_seconds(3, 6) == 0.050 and spec.step_seconds(3, 9) == pytest.approx(0.070)  # 6.7 ms a row


def _completions(llm, prompts, params):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason)
            for o in llm.generate(prompts, params) for c in o.outputs]


def test_stop_strings_end_a_speculative_step_where_plain_decoding_ends():
    # A verify step accepts several tokens at once; a stop string completed by one of them ends the completion
    # at that token, as one token a step would: the same tokens, text, finish and stop reason as plain decoding,
    # and usage counts only those tokens. Stop strings are taken from the plain text, so they do occur.
    model, tok = make(seed=2)
    prompts = PROMPTS[:8]
    llm_plain = LLM(model, tok, block_size=4, max_num_batched_tokens=64)
    spec = SpeculativeConfig(prompt_lookup=3, prompt_lookup_min=1, num_draft=5, adaptive=False)
    llm_fast = LLM(model, tok, block_size=4, max_num_batched_tokens=64, speculative=spec)
    texts = [t for _, t, _, _ in _completions(llm_plain, prompts, GREEDY)]
    rng = random.Random(0)
    cases = 0
    for text in texts:
        for _ in range(4):
            if len(text) < 8:
                continue
            at = rng.randrange(2, len(text) - 3)
            stops = [text[at:at + rng.randint(1, 3)], text[at + 2:at + 5]]  # the later one first in the list
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops[::-1])
            before = llm_fast.engine.generation_tokens_total
            fast = _completions(llm_fast, prompts, params)
            assert fast == _completions(llm_plain, prompts, params)
            assert llm_fast.engine.generation_tokens_total - before == sum(len(t) for t, _, _, _ in fast)
            cases += sum(r == "stop" for _, _, r, _ in fast)
    assert cases > 20 and llm_fast.engine.speculator.stats.accepted > 0
    assert llm_fast.engine.block_manager.num_used_blocks == 0


def test_a_stop_string_before_a_split_character_in_one_step_ends_there():
    # One step appends "a", "b" and the first byte of "é": the text waits for the character's second byte, so the
    # step's text does not show "ab" yet; plain decoding, one token a step, would have stopped at "b".
    model, tok = make()
    engine = LLM(model, tok, block_size=4).engine
    engine.add_request("r", tok.encode("hi"), SamplingParams(temperature=0, max_tokens=10, stop=["ab"]))
    req = engine._requests["r"]
    seq = req.seqs[0]
    for step in ([ord("x"), ord("y")], [ord("a"), ord("b"), 0xC3]):
        for t in step:
            seq.append_token(t)
        engine._update_completion(req, 0)
    comp = req.outputs[0]
    assert comp.token_ids == [ord(c) for c in "xyab"] and comp.text == "xy"
    assert (comp.finish_reason, comp.stop_reason) == ("stop", "ab")


def test_the_stop_string_that_ends_first_wins():
    from slimlm.serve.engine.engine import _first_stop

    assert _first_stop("xab", 1, ["b", "a"]) == (1, "a")  # both new in one step: "a" came first
    assert _first_stop("xabc", 1, ["abc", "b"]) == (2, "b")  # "b" was whole before "abc" was
    assert _first_stop("xab", 1, ["ab", "b"]) == (1, "ab")  # both end at once: the longer one
    assert _first_stop("ab", 2, ["a", "zz"]) is None  # "a" was given out already


def test_a_finished_request_leaves_no_drafting_state():
    # Per-sequence state (n-gram index, acceptance, probe counters) is dropped however a sequence ends: at
    # max_tokens on a step that did not draft, at EOS, at a stop string.
    model, tok = make(seed=2)
    llm = LLM(model, tok, block_size=4, speculative=SpeculativeConfig(prompt_lookup=3, prompt_lookup_min=1))
    llm.generate(PROMPTS[:6], GREEDY)
    llm.generate(PROMPTS[:6], SamplingParams(temperature=0, max_tokens=24, stop=["e", "o", " "]))
    sp = llm.engine.speculator
    assert sp.stats.steps > 0
    assert not sp.index and not sp.acceptance and not sp.plain_steps and not sp.probe_wait
