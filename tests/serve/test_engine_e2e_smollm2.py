"""The engine on the built-in SmolLM2-135M (fp32): greedy output token-identical to HF generate on
every prompt of a fixed set, at batch 1 and batch 8, with prefix caching on and off."""
import pytest
import torch

from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import load

pytestmark = pytest.mark.e2e
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three primary colors are", "Water boils at", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
           "In 1492, Columbus", "import numpy as np\n"]
NEW = 24


@pytest.fixture(scope="module")
def model_and_reference():
    model, tok = load("smollm2-135m")
    ref = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            ref[p] = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:].tolist()
    return model, tok, ref


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_greedy_identical_to_hf(model_and_reference, prefix_caching):
    model, tok, ref = model_and_reference
    llm = LLM(model, tok, enable_prefix_caching=prefix_caching)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW))
    assert {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)} == ref


def test_batch_1_greedy_identical_to_hf(model_and_reference):
    model, tok, ref = model_and_reference
    llm = LLM(model, tok)
    for p in PROMPTS[:4]:
        assert llm.generate(p, SamplingParams(temperature=0, max_tokens=NEW))[0].outputs[0].token_ids == ref[p]
