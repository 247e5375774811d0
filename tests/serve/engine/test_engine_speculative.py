"""Self-speculative decoding in the engine: greedy output identical to plain decoding at batch 1 and 16,
whatever the drafts' quality; the paged KV cache never leaks a block; the adaptive policy backs off."""
import pytest
import torch

from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.engine.speculative import SelfSpeculator, SpeculativeConfig, expected_speedup
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "zzzz zzzz zzzz zzzz zzzz zzzz",
           "SYSTEM: be brief. USER: hi", "SYSTEM: be brief. USER: what is 2+2?", "0123456789" * 3,
           "Once upon a time", "x", "fn main() {}", "SYSTEM: be brief. USER: bye", "é ü ß ∑",
           "The capital of France is", "def f(x): return x", "one two three four five", "!"]
GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings and drafts on one thread


def make(arch="llama", layers=4, seed=0, skip_from=None):
    """A wide-init tiny model; `skip_from=E` zeroes the residual writes of layers >= E, so an exit after E
    layers (with the final norm) predicts exactly what the full model does: every draft is accepted."""
    model, tok = tiny_model(arch, seed=seed, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if skip_from is not None:
            for layer in model.model.layers[skip_from:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model, tok


def run(model, tok, prompts, spec=None, params=GREEDY, **config):
    llm = LLM(model, tok, block_size=4, max_num_batched_tokens=64, speculative=spec, **config)
    outs = llm.generate(prompts, params)
    assert llm.engine.block_manager.num_used_blocks == 0  # nothing leaked
    return [o.outputs[0].token_ids for o in outs], llm.engine


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("exit_layer, num_draft", [(1, 3), (3, 2)])
def test_greedy_output_equals_plain_decoding(arch, batch, exit_layer, num_draft):
    model, tok = make(arch)
    prompts = PROMPTS[:batch]
    plain, _ = run(model, tok, prompts)
    spec = SpeculativeConfig(exit_layer=exit_layer, num_draft=num_draft, adaptive=False)
    fast, engine = run(model, tok, prompts, spec)
    assert fast == plain
    st = engine.speculator.stats
    assert st.steps > 0 and st.drafted == sum(k * n for k, (n, _) in st.by_draft_len.items())


def test_drafts_that_always_agree_are_all_accepted_and_stay_exact():
    model, tok = make(layers=4, skip_from=2)
    plain, _ = run(model, tok, PROMPTS[:5])
    fast, engine = run(model, tok, PROMPTS[:5], SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False))
    assert fast == plain
    st = engine.speculator.stats
    assert st.acceptance_rate == 1.0
    assert st.mean_accepted_length > 3  # 14 tokens in about 14 / 5 steps per sequence
    assert all(len(t) == 14 for t in fast)  # max_tokens is kept even when a step could emit more


def test_random_exits_are_mostly_rejected_yet_exact_under_memory_pressure():
    model, tok = make(layers=4, seed=1)
    plain, _ = run(model, tok, PROMPTS, num_blocks=40, max_model_len=64)
    fast, engine = run(model, tok, PROMPTS, SpeculativeConfig(exit_layer=1, num_draft=3, adaptive=False),
                       num_blocks=40, max_model_len=64)
    assert fast == plain
    assert engine.speculator.stats.acceptance_rate < 0.9


def test_eos_inside_accepted_drafts_stops_there():
    model, tok = make(layers=4, skip_from=2)
    plain, _ = run(model, tok, PROMPTS[:4])
    # a token the first prompt produces first at a position inside a 5-token speculative step (not its end)
    pos = next(p for p in (3, 2, 4, 7, 8) if plain[0][p] not in plain[0][:p])
    stop_at = plain[0][pos]
    params = SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[stop_at])
    want, _ = run(model, tok, PROMPTS[:4], params=params)
    got, _ = run(model, tok, PROMPTS[:4], SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False), params=params)
    assert got == want and got[0][-1] == stop_at and len(got[0]) == pos + 1
    llm = LLM(model, tok, block_size=4, speculative=SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False))
    outs = llm.generate(PROMPTS[:4], params)
    # tokens drafted past the stop are not counted as generated
    assert llm.engine.stats()["generation_tokens_total"] == sum(len(o.outputs[0].token_ids) for o in outs)


@pytest.mark.parametrize("stop", ["token", "string", "eos"])
def test_counters_count_what_the_output_kept_not_drafts_past_a_stop(stop):
    """Exits that always agree: the first speculative step drafts 4 and all are accepted, but the output stops at
    its first draft (a stop token, a stop string, EOS). Accepted and emitted count that one token, not the five
    the verify pass produced; the generated-token total agrees."""
    model, tok = make(layers=4, skip_from=2)
    prompt = list(range(40, 60))
    plain = LLM(model, tok, block_size=4).generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert plain[1] not in plain[:1]
    params = {"token": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop_token_ids=[plain[1]]),
              "string": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=[tok.decode([plain[1]])]),
              "eos": SamplingParams(temperature=0, max_tokens=14)}[stop]
    if stop == "eos":
        model.generation_config.eos_token_id = plain[1]
    if stop == "string" and tok.decode([plain[1]]) in tok.decode(plain[:1]):
        pytest.skip("the stop string already shows in the first token")  # not so with this seed
    llm = LLM(model, tok, block_size=4, speculative=SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False))
    out = llm.generate([prompt], params)[0].outputs[0]
    st = llm.engine.speculator.stats
    kept = out.token_ids if stop != "string" else plain[:2]
    assert list(kept) == plain[:2] and llm.engine.stats()["generation_tokens_total"] == len(out.token_ids)
    assert (st.steps, st.drafted, st.accepted, st.emitted) == (1, 4, 1, 1)
    assert st.by_draft_len == {4: [1, 1]}


def test_block_tables_stay_consistent_every_step():
    model, tok = make(layers=4, seed=2)
    spec = SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False)
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_blocks=60, speculative=spec))
    for i, p in enumerate(PROMPTS[:8]):
        engine.add_request(str(i), tok(p).input_ids, GREEDY)
    while engine.has_unfinished():
        engine.step()
        live = engine.scheduler.unfinished()
        engine.block_manager.check_consistency(live)
        for seq in live:  # no look-ahead block survives a step
            assert len(seq.block_table) <= -(-seq.num_tokens // 4)
    assert engine.block_manager.num_used_blocks == 0


def test_logprob_and_penalty_requests_decode_plainly_and_sampled_ones_speculate():
    model, tok = make(layers=4)
    spec = SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False)
    for params in (SamplingParams(temperature=0, max_tokens=6, logprobs=2),
                   SamplingParams(temperature=0.8, max_tokens=6, seed=1, repetition_penalty=1.3)):
        plain, _ = run(model, tok, PROMPTS[:2], params=params)
        fast, engine = run(model, tok, PROMPTS[:2], spec, params=params)
        assert fast == plain and engine.speculator.stats.steps == 0
    sampled = SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True)  # unseeded: a seed decodes plainly
    torch.manual_seed(3)
    fast, engine = run(model, tok, PROMPTS[:3], spec, params=sampled)
    assert engine.speculator.stats.steps > 0 and all(len(t) == 9 for t in fast)
    torch.manual_seed(3)
    again, _ = run(model, tok, PROMPTS[:3], spec, params=sampled)
    assert again == fast  # the same draws from the default generator, the same text


def test_adaptive_policy_backs_off_when_drafts_miss_and_probes_again():
    model, tok = make(layers=4, seed=1)
    spec = SpeculativeConfig(exit_layer=1, num_draft=4, prior_acceptance=0.9, probe_every=4)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, _ = run(model, tok, PROMPTS[:2], params=params)
    fast, engine = run(model, tok, PROMPTS[:2], spec, params=params)
    assert fast == plain
    st = engine.speculator.stats
    assert st.steps > 0
    assert st.steps < 2 * 40 / 2  # it stopped drafting on most steps once drafts kept missing


def test_expected_speedup_model():
    assert expected_speedup(0.0, 0, 0.25, 0.1) == 1.0
    assert expected_speedup(0.0, 3, 0.25, 0.1) < 1.0          # nothing accepted: pure cost
    assert expected_speedup(0.95, 4, 0.2, 0.1) > 2.0          # good exits at a shallow layer pay
    assert expected_speedup(0.9, 4, 0.9, 0.1) < 1.0           # a deep exit drafts at nearly full price


def test_bad_configs_are_refused():
    model, tok = make(layers=4)
    with pytest.raises(ValueError, match="exit_layer must be in 1..3"):
        LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=4)))
    with pytest.raises(ValueError, match="num_draft"):
        LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=1, num_draft=0)))
    engine = LLMEngine(model, tok, EngineConfig())
    with pytest.raises(ValueError, match="exit_norm has shape"):
        SelfSpeculator(engine.model, SpeculativeConfig(exit_layer=1, exit_norm=torch.ones(3)))
    with pytest.raises(ValueError, match="exit_proj has shapes"):
        SelfSpeculator(engine.model, SpeculativeConfig(exit_layer=1, exit_proj=(torch.ones(3, 3), torch.ones(3))))


def test_stats_and_metrics_report_acceptance():
    from slimlm.serve.api.metrics import Metrics

    model, tok = make(layers=4, skip_from=2)
    _, engine = run(model, tok, PROMPTS[:3], SpeculativeConfig(exit_layer=2, num_draft=4, adaptive=False))
    stats = engine.stats()
    assert stats["spec_acceptance_rate"] == 1.0 and stats["spec_draft_tokens_total"] > 0
    text = Metrics(engine.stats).render().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["slimlm_spec_acceptance_rate"] == 1.0
    assert values["slimlm_spec_mean_accepted_length"] == stats["spec_mean_accepted_length"] > 1
    assert values["slimlm_spec_accepted_tokens_total"] == stats["spec_accepted_tokens_total"]
    _, plain = run(model, tok, PROMPTS[:1])
    assert "spec_acceptance_rate" not in plain.stats()


def test_measured_step_times_can_only_lower_the_cost_model():
    """Once this machine's step times are known, drafting happens only where both they and the cost model
    say it pays: a timing can veto drafting, never start it where drafts miss."""
    from slimlm.serve.engine.sequence import Sequence

    model, tok = make(layers=4)
    engine = LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=1, num_draft=3,
                                                                              probe_every=2)))
    spec = engine.speculator
    seq = Sequence(0, [1, 2, 3], max_tokens=50, params=GREEDY)
    spec.acceptance[0] = 0.95
    assert spec.draft_len(seq) > 0                        # the cost model alone: good drafts at a shallow exit pay
    spec.observe(0.010, batch=1, k=0)
    for k in (1, 2, 3):
        spec.observe(0.010 * (k + 2) * 2, batch=1, k=k)   # verify far dearer than the model assumes
    assert [spec.draft_len(seq) for _ in range(5)] == [0] * 5  # not even a probe: perfect drafts could not pay
    for k in (1, 2, 3):
        for _ in range(30):
            spec.observe(0.011, batch=1, k=k)             # now a speculative step costs about a plain one
    assert spec.draft_len(seq) == 3
    assert spec.gain(0.95, 3, batch=1) == pytest.approx(spec.model_speedup(0.95, 3))  # capped by the model
    spec.observe(0.001, batch=1, k=1)  # a freak timing: one speculative step "10x faster" than a plain one
    for _ in range(30):
        spec.observe(0.100, batch=1, k=0)
    spec.acceptance[0] = 0.0           # ... while every draft misses
    assert spec.gain(0.0, 1, batch=1) < 1 and spec.draft_len(seq) == 0


def test_a_batch_size_whose_plain_step_is_untimed_decodes_plainly_once_to_time_it():
    # Drafting from the cost model's prior at a new batch size times only speculative steps; unless a plain
    # step is timed there too, the prior alone decides (batch 16 measured 0.85x that way).
    from slimlm.serve.engine.sequence import Sequence

    model, tok = make(layers=4)
    engine = LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=1, num_draft=3)))
    spec = engine.speculator
    seq = Sequence(0, [1, 2, 3], max_tokens=50, params=GREEDY)
    spec.acceptance[0] = 0.95
    assert spec.draft_len(seq, batch=4) > 0          # nothing timed at 4: the cost model decides
    spec.observe(0.030, batch=4, k=3)
    assert spec.draft_len(seq, batch=4) == 0         # a speculative step timed, no plain one: time a plain step
    spec.observe(0.010, batch=4, k=0)                # plain 10 ms: 3 drafts at 30 ms make ~3.8 tokens, 1.3x
    assert spec.draft_len(seq, batch=4) > 0
    spec.observe(0.050, batch=8, k=3)
    assert spec.draft_len(seq, batch=8) == 0 and spec.draft_len(seq, batch=4) > 0  # per batch size


@pytest.mark.parametrize("rates", [(0.99, 0.0), (0.99, 0.99)], ids=["mixed", "both"])
def test_in_a_batch_every_sequence_drafts_or_none_does(rates):
    # A mixed step would run the plain sequence as a pass of its own beside the draft and verify passes:
    # the adaptive policy drafts in a batch only where all sequences would, and gives back the look-ahead
    # slots it reserved on the way.
    model, tok = make(layers=4)
    engine = LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=1, num_draft=3)))
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(str(i), tok.encode(prompt), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # both prompts prefilled
    out = engine.scheduler.schedule()
    seqs = [s.seq for s in out.scheduled]
    assert len(seqs) == 2 and all(s.num_output_tokens == 1 for s in seqs)
    spec, bm = engine.speculator, engine.block_manager
    for seq, rate in zip(seqs, rates):
        spec.acceptance[seq.seq_id] = rate
    assert [spec.draft_len(seq, batch=2) > 0 for seq in seqs] == [r > 0.5 for r in rates]
    used = bm.num_used_blocks
    plan = spec.plan(out, bm, engine.max_model_len)
    if rates[1] > 0.5:
        assert sorted(plan) == sorted(s.seq_id for s in seqs) and bm.num_used_blocks >= used
    else:
        assert plan == {} and bm.num_used_blocks == used  # nothing drafts, nothing stays reserved


def test_engine_times_pure_decode_steps():
    model, tok = make(layers=4)
    _, engine = run(model, tok, PROMPTS[:1], SpeculativeConfig(exit_layer=2, num_draft=2, adaptive=False))
    assert engine.speculator.spec_time.get((1, 2), 0) > 0


def test_new_sequences_start_from_the_engines_acceptance_and_probes_back_off():
    from slimlm.serve.engine.sequence import Sequence

    model, tok = make(layers=4)
    engine = LLMEngine(model, tok, EngineConfig(speculative=SpeculativeConfig(exit_layer=1, num_draft=3,
                                                                              probe_every=2)))
    spec = engine.speculator
    for seq_id in range(20):
        spec._record(seq_id, 3, 0)                       # every draft missed
    assert spec.engine_acceptance < 0.1
    fresh = Sequence(99, [1, 2], max_tokens=500, params=GREEDY)
    ks = [spec.draft_len(fresh) for _ in range(40)]
    assert ks[0] == 0                                     # no optimistic start after the engine's misses
    probes = [i for i, k in enumerate(ks) if k]
    assert probes and all(b - a > 2 for a, b in zip(probes, probes[1:]))  # waits grow: 2, 4, 8, ...
    assert probes[1] - probes[0] < probes[-1] - probes[-2] or len(probes) == 2


def test_exit_confidence_is_lossy_only_where_the_draft_is_sure():
    model, tok = make(layers=4, seed=1)
    plain, _ = run(model, tok, PROMPTS[:6])
    base = dict(exit_layer=1, num_draft=3, adaptive=False)
    never, _ = run(model, tok, PROMPTS[:6], SpeculativeConfig(**base, exit_confidence=1.01))  # no draft is that sure
    assert never == plain
    always, engine = run(model, tok, PROMPTS[:6], SpeculativeConfig(**base, exit_confidence=0.0))
    st = engine.speculator.stats
    assert st.acceptance_rate == 1.0  # every draft kept, right or wrong
    assert always != plain  # random exits: keeping their drafts changes the text
    lossless, engine = run(model, tok, PROMPTS[:6], SpeculativeConfig(**base))
    assert lossless == plain and engine.speculator.stats.acceptance_rate < 0.9
    assert not engine.speculator._conf  # nothing recorded without the option


def test_n_completions_of_a_one_token_prompt_fork_under_speculation():
    # A one-token prompt's first step looks like a decode; its first token must still come from the
    # prompt's logits, where the engine forks the other completions.
    model, tok = make(layers=4, skip_from=2)
    params = SamplingParams(temperature=0, n=3, max_tokens=6, ignore_eos=True)
    llm = LLM(model, tok, block_size=4, speculative=SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False))
    plain = LLM(model, tok, block_size=4)
    prompt = [tok("x").input_ids[-1]]
    got = [c.token_ids for c in llm.generate(prompt, params)[0].outputs]
    want = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    assert got == [want] * 3 and llm.engine.speculator.stats.steps > 0
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_verify_pass_runs_in_the_fused_stack_and_equals_plain_decoding(monkeypatch, batch):
    """bf16 on the shapes the C decode stack takes: the verify pass runs layers [E, L) there, one row per
    token, so each row rounds as a one-token step does and greedy output is plain decoding's exactly."""
    from slimlm.serve.models import cpu_decode

    model, tok = tiny_model("llama", seed=0, num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = model.to(torch.bfloat16)
    calls = []
    real = cpu_decode.DecodeStack.__call__

    def spy(self, x, cos, sin, kv_caches, meta, first, last):
        calls.append((first, last, x.shape[0]))
        return real(self, x, cos, sin, kv_caches, meta, first, last)

    monkeypatch.setattr(cpu_decode.DecodeStack, "__call__", spy)
    prompts = PROMPTS[:batch]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, engine = run(model, tok, prompts, params=params)
    if engine.model._decode_stack() is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    calls.clear()
    fast, engine = run(model, tok, prompts, SpeculativeConfig(exit_layer=2, num_draft=1, adaptive=False),
                       params=params)
    assert fast == plain
    assert engine.speculator.stats.steps > 0
    assert (2, 4, 2 * batch) in calls  # verify: layers 2..4, [last token, draft] of each sequence
    assert (0, 2, batch) in calls      # draft: layers 0..2


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_draft_head_drafts_through_a_quantized_copy_and_output_stays_exact(kind):
    from slimlm.serve.layers.quant_linear import QuantLinear

    model, tok = make(layers=4, skip_from=2)
    plain, _ = run(model, tok, PROMPTS[:6])
    fast, engine = run(model, tok, PROMPTS[:6],
                       SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False, draft_head=kind))
    assert fast == plain
    sp = engine.speculator
    assert isinstance(sp.draft_head, QuantLinear) and not isinstance(engine.model.lm_head, QuantLinear)
    h = torch.randn(5, engine.model.args.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        drafted, dense = sp.exit_logits(h), engine.model.lm_head(sp.norm(h))
    assert torch.equal(drafted, sp.draft_head(sp.norm(h)))
    assert not torch.equal(drafted, dense) and torch.allclose(drafted, dense, rtol=0.2, atol=0.2 * dense.abs().max())
    assert sp.stats.acceptance_rate > 0.5  # the exit predicts the model exactly; rounding flips few argmaxes


@pytest.mark.parametrize("batch", [1, 2])
def test_int8_kv_cache_verify_rows_store_as_decode_steps_do(batch):
    """bf16, int8 cache, the model as its own draft (every draft right): the verify pass runs all layers on
    one decode row per token, through the C stack's quantizing store one token at a time as successive
    decode steps do, so every block's scale and codes end where plain decoding's do and the greedy output
    is the same. (Rejected drafts can raise a block's scale before they are dropped, so with an int8 cache
    speculation is exact only up to that re-quantization.)"""
    model, tok = tiny_model("llama", seed=0, num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    model = model.to(torch.bfloat16)
    prompts = PROMPTS[:batch]  # at most 4 rows a step: plain and verify steps both in the C stack
    plain, _ = run(model, tok, prompts, kv_cache_dtype="int8")
    fast, engine = run(model, tok, prompts, SpeculativeConfig(draft_model=model, num_draft=1, adaptive=False),
                       kv_cache_dtype="int8")
    assert engine.speculator.stats.acceptance_rate == 1.0
    assert fast == plain


def test_a_lens_exit_drafts_through_its_map_and_stays_exact():
    model, tok = make(layers=4, skip_from=2)  # exit 2 through the final norm predicts the full model exactly
    d = model.config.hidden_size
    plain, _ = run(model, tok, PROMPTS[:4])
    zero = (torch.zeros(d, d), torch.zeros(d))
    fast, engine = run(model, tok, PROMPTS[:4], SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False,
                                                                  exit_proj=zero))
    assert fast == plain and engine.speculator.stats.acceptance_rate == 1.0
    g = torch.Generator().manual_seed(3)
    bent = (torch.randn(d, d, generator=g), torch.randn(d, generator=g) * 3)  # a map that spoils the drafts
    fast, engine = run(model, tok, PROMPTS[:4], SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False,
                                                                  exit_proj=bent))
    assert fast == plain and engine.speculator.stats.acceptance_rate < 0.9
    h = torch.randn(3, d, generator=g)
    with torch.no_grad():
        n = model.model.norm(h)
        want = model.lm_head(n + n @ bent[0].T + bent[1])
    torch.testing.assert_close(engine.speculator.exit_logits(h), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [SpeculativeConfig(exit_layer=2, num_draft=3, adaptive=False),
                                  SpeculativeConfig(num_draft=3, adaptive=False, prompt_lookup=2, prompt_lookup_min=1)],
                         ids=["self", "ngram"])
def test_sampling_through_logits_with_no_valid_probability_falls_back_to_the_argmax(spec):
    """A target whose logits overflow (a token's logit inf, the softmax NaN): plain sampling takes the row's argmax;
    speculative sampling raised "invalid multinomial distribution" and failed the step for the whole batch."""
    model, tok = tiny_model("qwen2", seed=0, num_hidden_layers=4)
    with torch.no_grad():
        model.lm_head.weight[65].fill_(3e38)  # token "A": its logit overflows wherever the hidden state leans its way
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)  # no seed: seeded requests decode plainly
    prompts = ["hello world", "the quick brown fox", "abc", "zzz"]
    torch.manual_seed(0)
    plain = LLM(model, tok, block_size=4, num_blocks=64).generate(prompts, params)
    torch.manual_seed(0)
    llm = LLM(model, tok, block_size=4, num_blocks=64, speculative=spec)
    fast = llm.generate(prompts, params)
    assert any(65 in o.outputs[0].token_ids for o in plain)  # the overflowing token is reached
    assert [len(o.outputs[0].token_ids) for o in fast] == [12] * 4 and llm.engine.speculator.stats.steps > 0
