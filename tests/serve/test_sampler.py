"""The batched sampler against the plain one-row reference, on random logits."""
import pytest
import torch

from slimlm.serve.kernels import cpu_build
from slimlm.serve.layers.sampler import (_argmax_library, apply_penalties, argmax_rows, filter_logits,
                                          reference_filtered_row, sample)
from slimlm.serve.sampling_params import SamplingParams

V = 50


def random_params(g: torch.Generator) -> SamplingParams:
    r = lambda: torch.rand((), generator=g).item()  # noqa: E731
    return SamplingParams(
        temperature=0.0 if r() < 0.3 else 0.3 + 1.5 * r(),
        top_k=0 if r() < 0.5 else int(1 + r() * 20),
        top_p=1.0 if r() < 0.5 else 0.2 + 0.8 * r(),
        min_p=0.0 if r() < 0.6 else 0.2 * r(),
        repetition_penalty=1.0 if r() < 0.5 else 0.8 + 0.6 * r(),
        presence_penalty=0.0 if r() < 0.5 else 2 * r() - 1,
        frequency_penalty=0.0 if r() < 0.5 else 2 * r() - 1,
    )


@pytest.mark.parametrize("seed", range(5))
def test_batched_filters_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    S = 8
    logits = torch.randn(S, V, generator=g) * 3
    params = [random_params(g) for _ in range(S)]
    prompts = [torch.randint(0, V, (10,), generator=g).tolist() for _ in range(S)]
    outputs = [torch.randint(0, V, (6,), generator=g).tolist() for _ in range(S)]
    penalised = apply_penalties(logits.clone(), params, prompts, outputs)
    sampling = [i for i, p in enumerate(params) if not p.greedy]
    filtered = filter_logits(penalised[sampling], [params[i] for i in sampling]) if sampling else None
    for i, p in enumerate(params):
        ref = reference_filtered_row(logits[i], p, prompts[i], outputs[i])
        got = penalised[i] if p.greedy else filtered[sampling.index(i)]
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"row {i}: {p}"
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_greedy_is_the_argmax_and_logprobs_are_the_models():
    logits = torch.randn(4, V)
    out = sample(logits, [SamplingParams(temperature=0, logprobs=3)] * 4, [None] * 4)
    assert out.tokens == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    assert out.logprobs == pytest.approx(lp.max(-1).values.tolist(), abs=1e-6)
    assert [t for t, _ in out.top_logprobs[0]] == torch.topk(lp[0], 3).indices.tolist()


def test_logprobs_are_computed_only_when_a_row_asks():
    logits = torch.randn(3, V)
    plain = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert plain.logprobs is None and plain.top_logprobs is None and plain.tokens == logits.argmax(-1).tolist()
    mixed = sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0),
                            SamplingParams(temperature=0)], [None] * 3)
    assert mixed.tokens == plain.tokens
    assert mixed.logprobs[1] == pytest.approx(torch.log_softmax(logits[1], -1).max().item(), abs=1e-6)


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    logits = torch.randn(3, V)
    p = SamplingParams(temperature=1.0, seed=7)
    draw = lambda rows, others: sample(  # noqa: E731
        logits[rows], [p] + [SamplingParams(temperature=1.0)] * others,
        [torch.Generator().manual_seed(7)] + [None] * others).tokens[0]
    assert len({draw([0], 0), draw([0, 1, 2], 2)}) == 1
    assert len({tuple(sample(logits[[0]], [p], [torch.Generator().manual_seed(7 + k)]).tokens) for k in range(20)}) > 1


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, [SamplingParams(temperature=1.0)], [g]).tokens[0]] += 1
    torch.testing.assert_close(counts / counts.sum(), logits.softmax(-1)[0], atol=0.03, rtol=0)


def test_top_k_1_is_greedy_and_top_p_tiny_keeps_the_best():
    logits = torch.randn(2, V)
    g = torch.Generator().manual_seed(1)
    out = sample(logits, [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)], [g, g])
    assert out.tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("bad, words", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(n=1000), "n must"), (dict(stop=["x"] * 1000), "stop takes at most 16 strings"),
    (dict(logprobs=99), "logprobs"), (dict(stop=[""]), "non-empty"), (dict(top_k=-5), "top_k"),
])
def test_bad_sampling_params_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**bad)


def test_extreme_but_valid_settings_never_crash_the_batch():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=5e-324), SamplingParams(temperature=1.0, top_p=5e-324),
              SamplingParams(temperature=1e-39)]
    out = sample(logits, params, [None] * 3)
    assert out.tokens == logits.argmax(-1).tolist()  # tiny temperature is greedy; tiny top_p keeps the best


def test_tiny_repetition_penalty_is_refused():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-39)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 61, 49152])
def test_argmax_rows_is_torch_argmax_with_ties_nan_and_inf(dtype, n):
    if cpu_build.cpu_isa() is None:
        pytest.skip("no CPU kernels on this CPU (neither AVX-512 BF16 nor AVX2): argmax_rows is torch.argmax")
    assert _argmax_library() is not None  # the kernel is what runs below
    g = torch.Generator().manual_seed(n)
    rows = [torch.randn(n, generator=g) for _ in range(4)]
    tie = torch.randn(n, generator=g)
    tie[torch.randint(0, n, (3,), generator=g)] = 9.0             # the same maximum at up to 3 places: the first wins
    rows.append(tie)
    rows.append(torch.full((n,), float("-inf")))                   # all -inf: index 0
    nan = torch.randn(n, generator=g)
    nan[torch.randint(0, n, (2,), generator=g)] = float("nan")    # a NaN counts as the largest
    nan[0] = float("inf")
    rows.append(nan)
    high = torch.randn(n, generator=g)
    high[-1] = float("inf")                                        # the maximum in the last (tail) element
    rows.append(high)
    x = torch.stack(rows).to(dtype)
    assert argmax_rows(x) == x.float().argmax(-1).tolist()
    assert argmax_rows(x[2:3].contiguous()) == [x[2].float().argmax().item()]


def test_greedy_sampling_takes_the_argmax_in_the_logits_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=g).bfloat16()
    out = sample(logits, [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert out.tokens == logits.float().argmax(-1).tolist() and out.logprobs is None
    # with a penalty the general path runs (in float32): still the argmax of the penalised logits
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    top = int(logits[0].float().argmax())
    pen = sample(logits[:1], [p], [None], [[top]], [[]])
    assert pen.tokens == [int(apply_penalties(logits[:1].float().clone(), [p], [[top]], [[]]).argmax())]
