"""The model cascade (serve/cascade.py): which prompts escalate, and that every answer is exactly the
answer of the model that gave it."""
import pytest
import torch

from slimlm.serve.cascade import Cascade, confidence
from slimlm.serve.engine.outputs import CompletionOutput
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

PROMPTS = ["hello world", "the quick brown fox", "0123456789", "SYSTEM: be brief. USER: hi", "zzzz", "a b c d e"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def wide(seed, layers=None):
    kw = {} if layers is None else {"num_hidden_layers": layers}
    model, tok = tiny_model("llama", seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


@pytest.fixture(scope="module")
def pair():
    (small, tok), (large, _) = wide(1, layers=1), wide(0)
    return LLM(small, tok), LLM(large, tok)


def answers(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_each_prompt_is_answered_by_the_model_its_confidence_picks(pair):
    small, large = pair
    scored = [confidence(o.outputs[0]) for o in small.generate(PROMPTS, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))]
    threshold = sorted(scored)[len(scored) // 2]  # about half below
    result = Cascade(small, large, threshold).generate(PROMPTS, GREEDY)
    small_answers, large_answers = answers(small, PROMPTS), answers(large, PROMPTS)
    assert [r.answered_by for r in result] == ["large" if c < threshold else "small" for c in scored]
    assert 0 < sum(r.answered_by == "large" for r in result) < len(PROMPTS)
    for r, s, big, c in zip(result, small_answers, large_answers, scored):
        assert r.output.outputs[0].token_ids == (big if r.answered_by == "large" else s)
        assert r.confidence == pytest.approx(c)
        assert r.output.outputs[0].logprobs is None  # not asked for by the caller


def test_threshold_zero_escalates_everything_and_a_low_one_nothing(pair):
    small, large = pair
    assert all(r.answered_by == "large" for r in Cascade(small, large, 0.0).generate(PROMPTS, GREEDY))
    low = Cascade(small, large, -1e9).generate(PROMPTS, GREEDY)
    assert [r.output.outputs[0].token_ids for r in low] == answers(small, PROMPTS)


def test_bad_cascades_are_refused(pair):
    small, large = pair
    with pytest.raises(ValueError, match="<= 0"):
        Cascade(small, large, 0.5)
    other, tok = tiny_model("llama", seed=2, vocab_size=300)
    with pytest.raises(ValueError, match="one tokenizer"):
        Cascade(small, LLM(other, tok), -1.0)
    with pytest.raises(ValueError, match="logprobs"):
        confidence(CompletionOutput(index=0, token_ids=[1]))
