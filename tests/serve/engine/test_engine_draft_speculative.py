"""Draft-model speculative decoding: greedy output identical to plain decoding whatever the draft (the
target itself, a model that agrees on most tokens, a random one), through preemption and prefix
caching; the draft cache follows the target's blocks; bad drafts are refused clearly."""
import pytest
import torch

from slimlm.serve.engine import draft_speculative
from slimlm.serve.engine.draft_speculative import DraftSpeculator
from slimlm.serve.models import load_model
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


def test_the_engine_does_not_keep_the_transformers_draft_alive():
    """The engine drafts with its serving form of a transformers draft; holding the transformers model too (via
    the config) kept a second copy of the draft's weights for the server's lifetime."""
    import gc
    import weakref

    model, tok = make()
    draft, _ = make(seed=1, layers=2)
    alive = weakref.ref(draft)
    spec = SpeculativeConfig(num_draft=2, adaptive=False, draft_model=draft)
    llm = LLM(model, tok, block_size=4, speculative=spec)
    del draft
    gc.collect()
    assert alive() is None and llm.engine.config.speculative.draft_model is llm.engine.speculator.draft
    assert llm.generate(["hello"], GREEDY)[0].outputs[0].token_ids


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
    torch.manual_seed(0)  # unseeded requests (a seeded one decodes plainly) draw from the default generator
    outs = llm.generate([prompt] * n, SamplingParams(temperature=t, max_tokens=3, ignore_eos=True))
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
    llm = LLM(model, tok, block_size=4, num_blocks=32,
              speculative=SpeculativeConfig(draft_model=model, draft_shares_kv=False))
    spec = llm.engine.speculator
    assert len(spec.draft_caches) == len(model.model.layers)
    assert spec.draft_caches[0][0].shape == llm.engine.runner.kv_caches[0][0].shape


@pytest.mark.parametrize("seconds, drafts", [((0.010, 0.003), True), ((0.010, 0.012), False)])
def test_a_draft_is_priced_by_its_timed_decode_step(monkeypatch, seconds, drafts):
    # The price of a draft token is the draft's timed one-token step over the target's: a draft timed at
    # 0.3 of the target pays at the prior acceptance; one slower than the target never drafts, not even a
    # probe (no acceptance could pay for it).
    model, tok = make()
    draft, _ = make(seed=3, layers=2)
    monkeypatch.setattr(draft_speculative, "decode_step_seconds", lambda models, block_size: list(seconds))
    llm = LLM(model, tok, block_size=4, num_blocks=64, speculative=SpeculativeConfig(num_draft=3, draft_model=draft))
    spec = llm.engine.speculator
    assert spec.cost_fraction == pytest.approx(seconds[1] / seconds[0])
    llm.generate(PROMPTS[:2], GREEDY)
    assert (spec.stats.steps > 0) == drafts


def test_decode_step_seconds_times_each_model():
    # Positive, finite, and a model with 8x the layers at 8x the width takes longer per token than a tiny one.
    big, _ = make(layers=8, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
    small, _ = make(layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    big_s, small_s = draft_speculative.decode_step_seconds([load_model(big), load_model(small)], block_size=4)
    assert 0 < small_s < big_s < float("inf")


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
    config = dict(num_draft=3, adaptive=False, draft_model=draft, draft_shares_kv=False)
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


def _quantized_copy(model):
    """The target with every decoder weight rounded to 4 bits per row (RTN): a draft of the target's shape."""
    import copy

    draft = copy.deepcopy(model)
    with torch.no_grad():
        for layer in draft.model.layers:
            for lin in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                w = lin.weight
                scale = w.abs().amax(1, keepdim=True) / 7
                w.copy_((w / scale).round().clamp(-8, 7) * scale)
    return draft


@pytest.mark.parametrize("batch", [1, 12])
def test_a_quantized_copy_drafts_in_the_targets_kv_cache_and_stays_exact(batch):
    # A draft of the target's shape reads and writes the target's cache (no cache or catch-up of its own):
    # its approximate K/V of the drafted positions are overwritten by the verify pass before any row
    # reads them, so greedy output stays the plain engine's.
    model, tok = make()
    draft = _quantized_copy(model)
    plain, _ = run(model, tok, PROMPTS, max_num_seqs=batch)
    fast, engine = run(model, tok, PROMPTS, SpeculativeConfig(num_draft=3, adaptive=False, draft_model=draft),
                       max_num_seqs=batch)
    spec = engine.speculator
    assert spec.shares_kv and spec.draft_caches is None
    assert fast == plain
    assert 0 < spec.stats.accepted < spec.stats.drafted  # drafts kept and drafts rejected


def test_an_int8_kv_cache_is_not_shared_with_the_draft():
    # A draft's write into an int8 cache could grow a block's scale and re-round the target's entries there.
    model, tok = make()
    llm = LLM(model, tok, block_size=4, num_blocks=32, kv_cache_dtype="int8",
              speculative=SpeculativeConfig(draft_model=_quantized_copy(model)))
    assert not llm.engine.speculator.shares_kv and llm.engine.speculator.draft_caches is not None
    with pytest.raises(ValueError, match="draft_shares_kv needs a float KV cache"):
        LLM(model, tok, block_size=4, num_blocks=32, kv_cache_dtype="int8",
            speculative=SpeculativeConfig(draft_model=_quantized_copy(model), draft_shares_kv=True))


def test_a_shared_kv_draft_is_exact_under_preemption():
    model, tok = make()
    draft = _quantized_copy(model)
    prompts = PROMPTS + ["SYSTEM: be brief. USER: " + p for p in PROMPTS[:4]]
    plain, _ = run(model, tok, prompts, num_blocks=40, max_model_len=64)
    fast, engine = run(model, tok, prompts, SpeculativeConfig(num_draft=3, adaptive=False, draft_model=draft),
                       num_blocks=40, max_model_len=64)
    assert engine.speculator.shares_kv and engine.speculator.stats.steps > 0
    assert fast == plain


def test_sharing_the_kv_cache_with_a_draft_of_another_shape_is_refused():
    model, tok = make()
    draft, _ = make(layers=2)
    with pytest.raises(ValueError, match="draft_shares_kv needs a draft with the target's layers"):
        LLM(model, tok, block_size=4, num_blocks=32,
            speculative=SpeculativeConfig(draft_model=draft, draft_shares_kv=True))


def test_a_draft_with_other_rotary_frequencies_does_not_share_the_kv_cache():
    # Same layers, heads and rope parameters, but the draft rotates by other frequencies (a checkpoint's own
    # inv_freq): its K would sit at other angles in the target's cache.
    model, tok = make()
    draft = load_model(_quantized_copy(model))
    target = load_model(model)
    assert draft_speculative.can_share_kv(draft, target)
    draft.rotary.inv_freq = draft.rotary.inv_freq * 1.01
    assert not draft_speculative.can_share_kv(draft, target)


def test_a_fixed_draft_length_times_no_steps(monkeypatch):
    # The timed price only serves the adaptive policy: with adaptive off no decode step is timed at start.
    model, tok = make()
    calls = []
    monkeypatch.setattr(draft_speculative, "decode_step_seconds", lambda *a, **k: calls.append(1) or [1.0, 0.5])
    LLM(model, tok, block_size=4, num_blocks=32, speculative=SpeculativeConfig(draft_model=model, adaptive=False))
    assert not calls
    LLM(model, tok, block_size=4, num_blocks=32, speculative=SpeculativeConfig(draft_model=model))
    assert calls
