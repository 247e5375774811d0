"""The fused CPU decode stack against the layer-by-layer path and against transformers."""
import random

import pytest
import torch

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.models import load_model
from slimlm.serve.models import cpu_decode
from slimlm.toolkit.models import tiny_model

BLOCK = 4
# Shapes the stack accepts (head_dim a multiple of 32; every projection in the GEMV kernel's layout).
STACK_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    initializer_range=0.3)


def decode(model, prompts, steps, stack: bool, kv_dtype=None):
    """Greedy: prefill every prompt in one step, then decode them together. Returns tokens and hidden rows."""
    model._stack = cpu_decode.decode_stack_for(model) if stack else None
    caches = model.allocate_kv_cache(64, BLOCK, dtype=kv_dtype)
    free = list(range(64))
    random.Random(0).shuffle(free)
    tables = [[] for _ in prompts]
    seqs, cached, hiddens = [list(p) for p in prompts], [0] * len(prompts), []
    for _ in range(steps):
        ids, pos, q_lens, s_lens = [], [], [], []
        for i, s in enumerate(seqs):
            new = s[cached[i]:]
            ids += new
            pos += range(cached[i], len(s))
            q_lens.append(len(new))
            s_lens.append(len(s))
            while len(tables[i]) * BLOCK < len(s):
                tables[i].append(free.pop())
        meta = AttentionMetadata.build(q_lens, s_lens, tables, BLOCK)
        with torch.no_grad():
            hidden = model(torch.tensor(ids), torch.tensor(pos), caches, meta)[meta.last_token_indices]
            nxt = model.compute_logits(hidden).float().argmax(-1).tolist()
        hiddens.append(hidden)
        for i, t in enumerate(nxt):
            cached[i] = len(seqs[i])
            seqs[i].append(t)
    del model._stack
    return [s[len(p):] for s, p in zip(seqs, prompts)], hiddens


@pytest.fixture(params=[("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)],
                ids=lambda p: f"{p[0]}-{str(p[1])[6:]}")
def pair(request):
    arch, dtype = request.param
    hf, _ = tiny_model(arch, seed=0, **STACK_SHAPES)
    model = load_model(hf, dtype=dtype)
    if cpu_decode.decode_stack_for(model) is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    return hf, model


@pytest.mark.parametrize("batch", [1, 4, 5, 12])
def test_stack_equals_the_layer_path(pair, batch, monkeypatch):
    # Bit for bit: the stack runs the same kernels in the same order. Past GEMV_MAX_ROWS it runs only
    # where every projection is in slimlm's own layout (bf16 where oneDNN does not pack it, as on AVX2),
    # whose GEMV the layer path also uses at any number of rows; otherwise both runs take the layer path
    # (the check that the switch is clean).
    _, model = pair
    gen = torch.Generator().manual_seed(batch)
    lengths = (7, 12, 3, 9, 5, 4, 8, 6, 2, 10, 11, 1)[:batch]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    calls = []
    real = cpu_decode.DecodeStack.__call__
    monkeypatch.setattr(cpu_decode.DecodeStack, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, h_fused = decode(model, prompts, 12, stack=True)
    own = all(lin.own_layout for layer in model.layers
              for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
    limit = cpu_decode.STACK_MAX_ROWS if own else cpu_decode.GEMV_MAX_ROWS
    assert len(calls) == (11 if batch <= limit else 0)  # every decode step after the prefill, or none
    layered, h_layered = decode(model, prompts, 12, stack=False)
    assert fused == layered
    for a, b in zip(h_fused, h_layered):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_stack_greedy_matches_hf_generate_fp32(pair):
    hf, model = pair
    if model.dtype != torch.float32:
        pytest.skip("token identity with HF is the fp32 contract")
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    ours, _ = decode(model, [prompt], 16, stack=True)
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: HF would mask prompt tokens equal to pad_token_id
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(set(ref)) > 3
    assert ours[0] == ref


def test_stack_runs_a_prefix_of_the_layers(pair):
    # num_layers (the early-exit seam) must stop the stack where it stops the layer path.
    _, model = pair
    caches = model.allocate_kv_cache(8, BLOCK)
    with torch.no_grad():
        meta = AttentionMetadata.build([5], [5], [[0, 1]], BLOCK)
        model(torch.arange(5), torch.arange(5), caches, meta)  # prefill
        outs = []
        for stack in (True, False):
            model._stack = cpu_decode.decode_stack_for(model) if stack else None
            meta = AttentionMetadata.build([1], [6], [[0, 1]], BLOCK)
            outs.append(model(torch.tensor([7]), torch.tensor([5]), caches, meta, num_layers=1))
        del model._stack
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_cache_in_the_stack_equals_the_layer_path(pair, batch, monkeypatch):
    # Int8 caches run in the stack too (the quantizing store and the int8 attention read), bit for bit
    # what the layer path computes with the same kernels.
    _, model = pair
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]][:batch]
    layered, h_layered = decode(model, prompts, 10, stack=False, kv_dtype=torch.int8)
    calls = []
    real = cpu_decode.DecodeStack.__call__
    monkeypatch.setattr(cpu_decode.DecodeStack, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, h_fused = decode(model, prompts, 10, stack=True, kv_dtype=torch.int8)
    assert len(calls) == 9  # every decode step after the prefill
    assert fused == layered
    for a, b in zip(h_fused, h_layered):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_stack_not_built_where_it_cannot_run(monkeypatch):
    hf, _ = tiny_model("qwen3", seed=0)  # per-head q/k norms: the layer path
    assert cpu_decode.decode_stack_for(load_model(hf)) is None
    hf, _ = tiny_model("llama", seed=0, **STACK_SHAPES)
    monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    assert cpu_decode.decode_stack_for(load_model(hf)) is None


def test_silu_mul_equals_pytorch():
    for dtype in (torch.float32, torch.bfloat16):
        gu = (torch.randn(3, 2 * 96) * 4).to(dtype)
        ref = torch.nn.functional.silu(gu[:, :96]) * gu[:, 96:]
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(cpu_decode.silu_mul(gu), ref, **tol)
        if dtype == torch.bfloat16:  # rounds where PyTorch rounds: nearly always the same bits
            assert (cpu_decode.silu_mul(gu) != ref).float().mean() < 0.01


def test_stack_writes_a_cache_swapped_into_the_same_list(pair):
    # The stack skips its checks when it sees the very cache tensors it bound last; a pair replaced in the
    # same list (same shapes, new tensors) must be bound again, so the step writes the new cache, not the old.
    _, model = pair
    model._stack = cpu_decode.decode_stack_for(model)
    caches = model.allocate_kv_cache(8, BLOCK)
    meta = AttentionMetadata.build([1], [3], [[2]], BLOCK)  # a decode row at position 2: slot 2 * BLOCK + 2
    ids, pos = torch.tensor([5]), torch.tensor([2])
    with torch.no_grad():
        model(ids, pos, caches, meta)
        old_k = caches[1][0]
        assert old_k[2, 2].abs().sum() > 0  # the stack ran and wrote layer 1's key
        fresh = model.allocate_kv_cache(8, BLOCK)[1]
        caches[1] = fresh
        old_k.zero_()
        model(ids, pos, caches, meta)
    assert fresh[0][2, 2].abs().sum() > 0 and old_k.abs().sum() == 0
    del model._stack
