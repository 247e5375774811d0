"""Decode steps through the CUDA-graph runner's static, padded buffers (engine/cuda_graph.py).

On a CPU the runner runs the same padded step eagerly, so these tests check what a replay depends on
besides the capture itself: bucketing, padding rows that write only the scratch block, block tables
as wide as max_model_len, copy-on-write and preemption underneath. Greedy outputs must equal the plain
engine's token for token. (The capture and replay are checked on a GPU by scripts/cuda_engine_check.py.)
"""
import pytest
import torch

from slimlm.serve.engine.cuda_graph import DecodeGraphs
from slimlm.serve.llm import LLM
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model


def make_model():
    model, tok = tiny_model("llama", seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # wide init: varied greedy text
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


def generate(llm, prompts, params):
    return [[list(c.token_ids) for c in out.outputs] for out in llm.generate(prompts, params)]


PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 1, 40, 9, 26, 2, 33, 12, 7, 21)]


@pytest.mark.parametrize("batch, num_blocks", [(1, None), (3, None), (11, None), (11, 40)])
def test_padded_decode_matches_the_plain_engine(batch, num_blocks):
    model, tok = make_model()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        llm = LLM(model, tok, block_size=4, max_num_seqs=16, max_model_len=128, num_blocks=num_blocks,
                  cuda_graphs=graphs)
        outs[graphs] = generate(llm, PROMPTS[:batch], params)
        assert llm.engine.block_manager.num_used_blocks == 0
        if graphs:
            assert llm.engine.runner.graphs.steps >= 15  # the decode steps went through the padded runner
    assert outs[True] == outs[False]


def test_n_completions_copy_on_write_under_graphs():
    model, tok = make_model()
    params = SamplingParams(temperature=0.8, top_k=20, seed=4, n=3, max_tokens=12, ignore_eos=True)
    outs = [generate(LLM(model, tok, block_size=4, max_model_len=64, cuda_graphs=g), PROMPTS[1:3], params)
            for g in (False, True)]
    assert outs[0] == outs[1]


def test_buckets_and_which_steps_run_through_the_graphs():
    from slimlm.serve.engine.scheduler import ScheduledSeq, SchedulerOutput
    from slimlm.serve.engine.sequence import Sequence
    from slimlm.serve.models import load_model

    m = load_model(make_model()[0]).eval()
    kv = m.allocate_kv_cache(9, 4)
    graphs = DecodeGraphs(m, kv, block_size=4, max_model_len=30, max_batch=20, scratch_block=8)
    assert graphs.buckets == [1, 2, 4, 8, 16, 20] and graphs.width == 8
    assert [graphs.bucket(n) for n in (1, 3, 5, 16, 17, 20)] == [1, 4, 8, 16, 20, 20]
    seq = Sequence(0, [1, 2, 3], max_tokens=5)
    step = lambda *s: SchedulerOutput(scheduled=[ScheduledSeq(seq, *a) for a in s])  # noqa: E731
    assert graphs.can_run(step((1, 2, True)), set())
    assert not graphs.can_run(step((3, 0, True)), set())             # a prefill
    assert not graphs.can_run(step((1, 2, False)), set())            # a row that does not sample
    assert not graphs.can_run(step((1, 2, True)), {0})               # prompt logprobs wanted
    assert not graphs.can_run(step(*[(1, 2, True)] * 21), set())     # past the largest bucket
    with pytest.raises(ValueError, match="max_batch"):
        DecodeGraphs(m, kv, 4, 30, 0, 8)
