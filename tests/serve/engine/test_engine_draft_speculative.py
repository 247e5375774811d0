"""Draft-model speculative decoding: greedy output identical to plain decoding whatever the draft (the
target itself, a model that agrees on most tokens, a random one), through preemption and prefix
caching; the draft cache follows the target's blocks; bad drafts are refused clearly."""
import pytest
import torch

from slimlm.serve.engine.draft_speculative import DraftSpeculator
from slimlm.serve.engine.speculative import SpeculativeConfig
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "zzzz zzzz zzzz zzzz zzzz zzzz",
           "SYSTEM: be brief. USER: hi", "SYSTEM: be brief. USER: what is 2+2?", "0123456789" * 3,
           "Once upon a time", "x", "fn main() {}", "SYSTEM: be brief. USER: bye", "The capital of France is"]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings and drafts on one thread


def make(seed=0, layers=4, init=0.3, **overrides):
    model, tok = tiny_model("llama", seed=seed, num_hidden_layers=layers, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * init)
    return model, tok


def run(model, tok, prompts, spec=None, params=GREEDY, **config):
    llm = LLM(model, tok, block_size=4, max_num_batched_tokens=64, speculative=spec, **config)
    outs = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_used_blocks == 0  # nothing leaked
    return [o.outputs[0].token_ids for o in outs], llm.engine


@pytest.mark.parametrize("batch", [1, 12])
def test_the_target_as_its_own_draft_accepts_everything_and_stays_exact(batch):
    model, tok = make()
    plain, _ = run(model, tok, PROMPTS[:batch])
    fast, engine = run(model, tok, PROMPTS[:batch], SpeculativeConfig(num_draft=4, adaptive=False, draft_model=model))
    assert isinstance(engine.speculator, DraftSpeculator)
    assert fast == plain
    st = engine.speculator.stats
    assert st.acceptance_rate == 1.0 and st.mean_accepted_length > 3


def test_a_close_draft_is_mostly_accepted_and_exact():
    # The draft: the target with its last two layers' residual writes removed (2 of 4 layers' worth).
    model, tok = make()
    draft, _ = make()
    with torch.no_grad():
        for layer in draft.model.layers[3:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    plain, _ = run(model, tok, PROMPTS)
    fast, engine = run(model, tok, PROMPTS, SpeculativeConfig(num_draft=3, adaptive=False, draft_model=draft))
    assert fast == plain
    assert 0.0 < engine.speculator.stats.acceptance_rate < 1.0


def test_a_random_smaller_draft_is_exact_under_memory_pressure_and_prefix_sharing():
    model, tok = make(seed=0)
    draft, _ = make(seed=5, layers=2, hidden_size=32, intermediate_size=64)
    prompts = PROMPTS + ["SYSTEM: be brief. USER: " + p for p in PROMPTS[:4]]  # shared prefixes
    plain, _ = run(model, tok, prompts, num_blocks=40, max_model_len=64)
    fast, engine = run(model, tok, prompts, SpeculativeConfig(num_draft=3, adaptive=False, draft_model=draft),
                       num_blocks=40, max_model_len=64)
    assert fast == plain
    assert engine.speculator.stats.steps > 0


def _second_token_marginal(model, prompt: list[int], temperature: float) -> torch.Tensor:
    """p(t2) = sum over t1 of p(t1 | prompt) p(t2 | prompt, t1), computed exactly with transformers."""
    with torch.no_grad():
        p1 = (model(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)        # [V]
        batch = torch.tensor([prompt + [t] for t in range(p1.numel())])
        p2 = (model(batch).logits[:, -1] / temperature).softmax(-1)                         # [V, V]
    return (p1[:, None] * p2).sum(0).double()


def test_speculative_sampling_keeps_the_target_distribution():
    # A draft far from the target: accepting its samples as they are would give the draft's distribution.
    # The acceptance rule must give the target's: the empirical distribution of the second generated token
    # (drawn in a speculative step) over 4,000 seeded requests stays within sampling noise of the exact one.
    model, tok = make(seed=0, init=0.4)
    draft, _ = make(seed=7, init=0.4)
    prompt = tok.encode("speculate")
    t = 1.0
    target = _second_token_marginal(model, prompt, t)
    draft_only = _second_token_marginal(draft, prompt, t)
    llm = LLM(model, tok, block_size=4, max_num_seqs=128, max_num_batched_tokens=2048,
              speculative=SpeculativeConfig(num_draft=2, adaptive=False, max_batch=128, draft_model=draft))
    n = 4000
    outs = llm.generate([prompt] * n, [SamplingParams(temperature=t, max_tokens=3, seed=i, ignore_eos=True)
                                       for i in range(n)])
    st = llm.engine.speculator.stats
    assert st.steps >= n and 0 < st.accepted < st.drafted  # drafted, some kept, some rejected
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]), minlength=target.numel()).double()
    # Pearson's chi-square over the tokens of probability > 0.5% (the rest pooled in one cell): ~df when
    # the samples follow `target` (plain sampling of these requests: 42.7, df 57). Sampling a rejected
    # position from p instead of max(p - q, 0) gives 214; accepting every draft, far more.
    big = target > 0.005
    cells = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = n * torch.cat([target[big], target[~big].sum()[None]])
    chi2 = ((cells - expected) ** 2 / expected).sum().item()
    df = cells.numel() - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5, f"chi-square {chi2:.1f} with {df} degrees of freedom"
    tv_draft = 0.5 * (draft_only - target).abs().sum().item()
    assert tv_draft > 0.4  # the test could tell the draft's distribution from the target's


def test_the_draft_cache_mirrors_the_target_blocks():
    model, tok = make()
    llm = LLM(model, tok, block_size=4, num_blocks=32, speculative=SpeculativeConfig(draft_model=model))
    spec = llm.engine.speculator
    assert len(spec.draft_caches) == len(model.model.layers)
    assert spec.draft_caches[0][0].shape == llm.engine.runner.kv_caches[0][0].shape
    assert 0.99 < spec.cost_fraction < 1.01  # the target as its own draft costs a full step per token


def test_a_draft_with_another_vocabulary_is_refused():
    model, tok = make()
    draft, _ = make(vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(model, tok, block_size=4, num_blocks=32, speculative=SpeculativeConfig(draft_model=draft))


def test_the_incremental_draft_cache_drafts_what_a_full_recompute_drafts(monkeypatch):
    # The draft keeps its KV across steps and trims it to the accepted tokens; recomputing the whole
    # context before every draft must give the same drafts, so the same acceptance, step by step.
    model, tok = make()
    draft, _ = make()
    with torch.no_grad():
        for layer in draft.model.layers[2:]:
            layer.mlp.down_proj.weight.mul_(0.3)
    config = dict(num_draft=3, adaptive=False, draft_model=draft)
    _, incremental = run(model, tok, PROMPTS[:6], SpeculativeConfig(**config))
    monkeypatch.setattr(DraftSpeculator, "_valid", lambda self, seq: 0)
    _, recompute = run(model, tok, PROMPTS[:6], SpeculativeConfig(**config))
    a, b = incremental.speculator.stats, recompute.speculator.stats
    assert 0 < a.accepted < a.drafted
    assert (a.steps, a.drafted, a.accepted) == (b.steps, b.drafted, b.accepted)


def test_a_draft_head_with_a_draft_model_is_refused():
    model, tok = make()
    draft, _ = make()
    with pytest.raises(ValueError, match="draft_head applies to self-speculation"):
        LLM(model, tok, block_size=4, num_blocks=32,
            speculative=SpeculativeConfig(draft_model=draft, draft_head="int8"))
