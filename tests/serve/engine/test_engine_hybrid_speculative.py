"""Prompt lookup with a draft model: each step a sequence drafts by lookup where its text repeats and with the
draft model elsewhere, all verified in one pass. Greedy output equals plain decoding at batch 1 and 16, with a
draft of its own cache and with one sharing the target's, under memory pressure and prefix sharing; the draft
cache catches up after lookup steps; sampled requests use each kind's acceptance rule; the policy picks the
kind expected to pay; bad configurations are refused."""
import pytest
import torch

from slimlm.serve.engine.draft_speculative import DraftSpeculator
from slimlm.serve.engine.hybrid_speculative import HybridSpeculator
from slimlm.serve.engine.ngram_speculative import accept_certain
from slimlm.serve.engine.speculative import SpeculativeConfig
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world hello world hello", "the quick brown fox jumps over the quick brown", "a",
           "zzzz zzzz zzzz zzzz zzzz zzzz", "SYSTEM: be brief. USER: hi", "0123456789" * 3, "Once upon a time",
           "x", "fn main() {} fn main() {}", "SYSTEM: be brief. USER: bye", "abc abd abc abd ab", "é ü ß ∑ é ü",
           "The capital of France is", "def f(x): return x", "one two three one two three one", "!"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings and drafts on one thread


def make(seed=0, layers=4, **overrides):
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=layers, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def close_draft(model):
    """The target with its last layers' residual writes shrunk: a draft that agrees on some tokens."""
    import copy

    draft = copy.deepcopy(model)
    with torch.no_grad():
        for layer in draft.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    return draft


def run(model, tok, prompts, spec=None, params=GREEDY, **config):
    llm = LLM(model, tok, block_size=4, max_num_batched_tokens=64, speculative=spec, **config)
    outs = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_used_blocks == 0  # nothing leaked
    return [o.outputs[0].token_ids for o in outs], llm.engine


def hybrid(draft, **config):
    base = dict(prompt_lookup=3, prompt_lookup_min=1, num_draft=3, adaptive=False, draft_model=draft)
    return SpeculativeConfig(**{**base, **config})


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("shares_kv", [False, True])
def test_greedy_output_equals_plain_decoding_with_both_kinds_of_draft(batch, shares_kv):
    model, tok = make()
    plain, _ = run(model, tok, PROMPTS[:batch])
    fast, engine = run(model, tok, PROMPTS[:batch], hybrid(close_draft(model), draft_shares_kv=shares_kv))
    spec = engine.speculator
    assert isinstance(spec, HybridSpeculator) and spec.shares_kv == shares_kv
    assert fast == plain
    assert 0 < spec.stats.lookup_steps < spec.stats.steps  # some steps drafted by lookup, others by the model
    assert spec.stats.accepted > 0


def test_exact_under_memory_pressure_and_prefix_sharing():
    model, tok = make(seed=2)
    draft, _ = make(seed=5, layers=2, hidden_size=32, intermediate_size=64)  # a small random draft, own cache
    prompts = PROMPTS + ["SYSTEM: be brief. USER: " + p for p in PROMPTS[:4]]
    plain, _ = run(model, tok, prompts, num_blocks=48, max_model_len=96)
    fast, engine = run(model, tok, prompts, hybrid(draft, num_draft=4), num_blocks=48, max_model_len=96)
    assert fast == plain
    assert 0 < engine.speculator.stats.lookup_steps < engine.speculator.stats.steps


def test_the_draft_cache_catches_up_after_lookup_steps_as_a_full_recompute_does(monkeypatch):
    # Lookup steps do not run the draft model, so its own cache falls behind; its next draft first reads the
    # tokens it missed. Recomputing the whole context before every model draft must draft the same tokens.
    model, tok = make()
    config = hybrid(close_draft(model), draft_shares_kv=False)
    _, incremental = run(model, tok, PROMPTS[:8], config)
    monkeypatch.setattr(DraftSpeculator, "_valid", lambda self, seq: 0)
    _, recompute = run(model, tok, PROMPTS[:8], config)
    a, b = incremental.speculator, recompute.speculator
    assert 0 < a.stats.lookup_steps < a.stats.steps
    assert (a.stats.steps, a.stats.drafted, a.stats.accepted, a.stats.lookup_steps) == \
        (b.stats.steps, b.stats.drafted, b.stats.accepted, b.stats.lookup_steps)


def test_sampled_requests_take_each_kinds_acceptance_rule_and_reproduce():
    model, tok = make()
    llm = LLM(model, tok, block_size=4, num_blocks=32, speculative=hybrid(close_draft(model)))
    spec = llm.engine.speculator
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
    q = [torch.tensor([0.1, 0.1, 0.7, 0.1]), torch.tensor([0.1, 0.1, 0.1, 0.7])]
    differ = 0
    for seed in range(40):
        spec.lookup = {1: [0, 1]}
        spec.generator_for = lambda sid: torch.Generator().manual_seed(seed)
        assert spec._accept_sampled(1, [0, 1], p) == accept_certain([0, 1], p, torch.Generator().manual_seed(seed))
        assert spec._accept_sampled(3, [], p[:1]) == accept_certain([], p[:1], torch.Generator().manual_seed(seed))
        spec._q[2] = list(q)
        expected = DraftSpeculator._accept_sampled(spec, 2, [2, 3], p)
        spec._q[2] = list(q)
        got = spec._accept_sampled(2, [2, 3], p)  # a model draft: its q, not certainty
        assert got == expected
        differ += got != accept_certain([2, 3], p, torch.Generator().manual_seed(seed))
    assert differ  # the two rules draw differently: the test could tell which one ran
    spec.lookup = {}
    sampled = SamplingParams(temperature=0.5, max_tokens=20, ignore_eos=True)  # unseeded: a seed decodes plainly
    torch.manual_seed(3)
    fast, engine = run(model, tok, PROMPTS[:6], hybrid(close_draft(model)), params=sampled)
    assert 0 < engine.speculator.stats.lookup_steps < engine.speculator.stats.steps and all(len(t) == 20 for t in fast)
    torch.manual_seed(3)
    again, _ = run(model, tok, PROMPTS[:6], hybrid(close_draft(model)), params=sampled)
    assert again == fast  # the same draws from the default generator, the same text


def test_the_policy_takes_the_kind_of_draft_expected_to_pay():
    model, tok = make()
    spec = LLM(model, tok, block_size=4, num_blocks=32,
               speculative=hybrid(close_draft(model), adaptive=True, verify_cost=0.1)).engine.speculator
    spec.cost_fraction = 0.5
    spec.acceptance[1] = 0.5
    spec.lookup_acceptance[1] = 0.9
    assert spec._lookup_pays(1, [7, 8, 9], 2, 1)  # free drafts that land beat paid ones that half land
    spec.lookup_acceptance[1], spec.acceptance[1] = 0.1, 0.95
    assert not spec._lookup_pays(1, [7, 8, 9], 3, 1)
    assert 0.1 < spec.lookup_acceptance[1] < spec.lookup_prior  # drifts back while it is not used
    spec.lookup_acceptance[1] = 0.2
    assert not spec._lookup_pays(1, [7, 8, 9], 0, 1)  # 1.25 tokens for 1.3 steps' work
    spec.lookup_acceptance[1] = 0.6
    assert spec._lookup_pays(1, [7, 8, 9], 0, 1)  # with no model draft worth it, lookup alone pays


def test_bad_configs_are_refused():
    model, tok = make()
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        LLM(model, tok, block_size=4, num_blocks=16, speculative=hybrid(model, prompt_lookup=2, prompt_lookup_min=3))
    with pytest.raises(ValueError, match="exit_confidence"):
        LLM(model, tok, block_size=4, num_blocks=16, speculative=hybrid(model, exit_confidence=0.9))
