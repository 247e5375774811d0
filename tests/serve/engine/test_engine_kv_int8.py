"""The model runner over an int8 KV cache: copy-on-write carries block scales, with a real tiny model
driven by the real scheduler (a fork shares blocks; the first write into a shared block copies it)."""
import torch

from slimlm.serve.engine import BlockManager, Scheduler, SchedulerConfig, Sequence
from slimlm.serve.engine.model_runner import ModelRunner
from slimlm.serve.layers import QuantizedKV
from slimlm.serve.models import load_model
from slimlm.toolkit.models import tiny_model

BLOCK = 4


def make_runner(num_blocks=32):
    hf, _ = tiny_model("llama", seed=0, initializer_range=0.3)
    model = load_model(hf).eval()
    bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), bm)
    return sched, bm, ModelRunner(model, num_blocks, BLOCK, kv_dtype=torch.int8)


def greedy_step(sched, runner):
    out = sched.schedule()
    logits = runner.execute(out)
    tokens = logits.sample.argmax(-1).tolist()
    sched.update(out, {sid: [t] for sid, t in zip(logits.sampled_ids, tokens)})
    return out, dict(zip(logits.sampled_ids, logits.sample))


def test_runner_allocates_int8_and_copies_scales():
    _, _, runner = make_runner()
    k, v = runner.kv_caches[0]
    assert isinstance(k, QuantizedKV) and k.data.dtype == torch.int8 and k.scale.shape == (32, k.shape[2])
    k.data[3].random_(-127, 127)
    k.scale[3] = torch.arange(1, k.shape[2] + 1)
    runner.copy_blocks([(3, 9)])
    assert torch.equal(k.data[9], k.data[3]) and torch.equal(k.scale[9], k.scale[3])
    per_layer = 2 * (k.data.numel() + k.scale.numel() * 4)
    assert runner.kv_cache_bytes() == per_layer * len(runner.kv_caches)


def test_fork_copy_on_write_carries_scales():
    # Parent and child continue from one shared, partly filled block with the same token: the copy
    # must hold the block's scales as well as its int8 data, so both read back the same context.
    sched, bm, runner = make_runner()
    parent = Sequence(0, [11, 42, 7, 99, 3, 250], max_tokens=4)  # 6 tokens: block 1 half full
    sched.add(parent)
    greedy_step(sched, runner)                                  # prefill + first token
    child = sched.fork(0, 1)
    shared = parent.block_table[1]
    out, logits = greedy_step(sched, runner)                    # both write into the shared block
    assert out.copy_ops and out.copy_ops[0][0] == shared
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    k = runner.kv_caches[0][0]
    copy = out.copy_ops[0][1]
    assert k.scale[copy].min() > 0  # the copy brought live scales, not a fresh block's zeros

    # The same prompt alone, with no fork: the parent's and child's logits equal its own.
    sched2, _, runner2 = make_runner()
    alone = Sequence(0, [11, 42, 7, 99, 3, 250], max_tokens=4)
    sched2.add(alone)
    greedy_step(sched2, runner2)
    _, solo = greedy_step(sched2, runner2)
    torch.testing.assert_close(logits[0], solo[0], atol=1e-5, rtol=1e-5)
    while sched.has_unfinished():
        greedy_step(sched, runner)
    assert parent.output_token_ids == child.output_token_ids  # greedy: the same tokens all along
    assert bm.num_free_blocks == bm.num_blocks
