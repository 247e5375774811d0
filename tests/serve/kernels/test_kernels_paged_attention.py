"""The Triton paged-attention and KV-store kernels against the plain references, on random steps.

Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py before Triton is imported), so
shapes stay tiny; tile sizes are shrunk so that every loop (query tiles, K/V tiles, splits) still
runs more than once.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); these tests run "
                                              "its kernels on the CPU under TRITON_INTERPRET=1")

from slimlm.serve.kernels import triton_available  # noqa: E402
from slimlm.serve.layers.attention import AttentionMetadata, reference_paged_attention, write_kv  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = triton_available(DEVICE)
IN_FRESH_PROCESS = os.environ.get("SLIMLM_KERNEL_TESTS_RERUN") == "1"
# In a fresh process a kernel that cannot run must fail, not skip, or the rerun would pass vacuously.
kernels = pytest.mark.skipif(
    not RUNNABLE and not IN_FRESH_PROCESS,
    reason="Triton was imported before TRITON_INTERPRET=1 was set (by a module collected earlier), so its "
           "kernels cannot run on the CPU in this process; test_rerun_in_a_fresh_process covers them")

if RUNNABLE:
    from slimlm.serve.kernels.paged_attention_triton import triton_paged_attention, triton_write_kv

BATCHES = {  # (cached tokens, new tokens) per sequence
    "decode": [(3, 1), (17, 1), (0, 1), (8, 1)],
    "prefill": [(0, 7), (0, 13)],
    "chunked": [(9, 5), (20, 6)],
    "mixed": [(5, 1), (0, 9), (12, 4), (30, 1), (2, 3)],
}
HEADS = [(4, 4), (8, 2), (8, 1)]  # (query heads, KV heads)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_step(seqs, block_size, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    """A random step whose sequences own shuffled blocks; every slot no sequence owns holds NaN,
    so a kernel that reads outside a context (or past its length) poisons its output."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    num_blocks = sum(math.ceil(s / block_size) for s in lens) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[pool.pop() for _ in range(math.ceil(s / block_size))] for s in lens]
    meta = AttentionMetadata.build([n for _, n in seqs], lens, tables, block_size, device=DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan")).to(dtype)
    v_cache = torch.full(shape, float("nan")).to(dtype)
    for table, s_len in zip(tables, lens):
        for p in range(s_len):
            k_cache[table[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[table[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(n for _, n in seqs), heads, head_dim, generator=g).to(dtype)
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta


def small_tiles(heads, kv_heads):
    """Tiles small enough that the test contexts (up to 31 positions) take several of each."""
    g_pad = 1 << math.ceil(math.log2(heads // kv_heads))
    return dict(block_q=max(1, 16 // g_pad), block_n=16, decode_block_n=16)


def check(seqs, block_size, heads, kv_heads, head_dim, dtype=torch.float32, **tiles):
    q, k_cache, v_cache, meta = make_step(seqs, block_size, heads, kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = triton_paged_attention(q, k_cache, v_cache, meta, scale, **tiles)
    assert out.shape == q.shape and out.dtype == dtype
    # The reference in fp32 from the same (rounded) inputs, so only the kernel's rounding is measured.
    cpu_meta = AttentionMetadata.build(meta.query_lens, meta.seq_lens_list, meta.block_tables.tolist(), block_size)
    ref = reference_paged_attention(q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), cpu_meta, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), ref, atol=tol, rtol=tol)


@kernels
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=[f"{h}q{k}kv" for h, k in HEADS])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_fp32_matches_reference(batch, heads, kv_heads, block_size):
    # Each block size meets every head dim, and each head layout two of them.
    head_dim = {4: 64, 2: 32, 1: 16}[kv_heads] if block_size == 16 else {4: 16, 2: 64, 1: 32}[kv_heads]
    check(BATCHES[batch], block_size, heads, kv_heads, head_dim, **small_tiles(heads, kv_heads))


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch", ["mixed", "chunked"])
def test_half_precision_matches_reference(batch, dtype):
    check(BATCHES[batch], 4, 8, 2, 32, dtype, **small_tiles(8, 2))


@kernels
@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_decode_split_k_matches_reference(batch, num_splits):
    # With 8 splits of 16-position tiles, the shorter contexts leave trailing splits empty.
    check(BATCHES[batch], 4, 8, 2, 16, num_splits=num_splits, **small_tiles(8, 2))


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_default_tiles_and_split_k_in_half_precision(dtype):
    check(BATCHES["mixed"], 16, 8, 2, 64, dtype)
    check(BATCHES["decode"], 16, 4, 4, 32, dtype, num_splits=4, decode_block_n=16)


@kernels
def test_long_prefill_chunk_behind_a_long_cached_context():
    # Several query tiles, each of whose causal limit falls inside a different K/V tile.
    check([(37, 21), (0, 1)], 16, 4, 2, 16, block_q=4, block_n=16, decode_block_n=16)


@kernels
def test_strided_q_from_a_fused_qkv_projection():
    heads, kv_heads, head_dim = 8, 2, 16
    q, k_cache, v_cache, meta = make_step(BATCHES["mixed"], 4, heads, kv_heads, head_dim)
    qkv = torch.randn(q.shape[0], (heads + 2 * kv_heads) * head_dim, device=DEVICE)
    qkv[:, :heads * head_dim] = q.reshape(q.shape[0], -1)
    q_view = qkv[:, :heads * head_dim].view(-1, heads, head_dim)  # rows strided by the fused width
    assert not q_view.is_contiguous()
    out = triton_paged_attention(q_view, k_cache, v_cache, meta, 0.25, **small_tiles(heads, kv_heads))
    torch.testing.assert_close(out, triton_paged_attention(q, k_cache, v_cache, meta, 0.25,
                                                           **small_tiles(heads, kv_heads)))


@kernels
def test_the_step_plan_is_built_once_and_shared_by_layers():
    q, k_cache, v_cache, meta = make_step(BATCHES["mixed"], 4, 4, 4, 16)
    first = triton_paged_attention(q, k_cache, v_cache, meta, 0.25, block_n=16, decode_block_n=16)
    plan = meta._triton_plan
    second = triton_paged_attention(q, k_cache, v_cache, meta, 0.25, block_n=16, decode_block_n=16)
    assert meta._triton_plan is plan
    torch.testing.assert_close(first, second)


@kernels
def test_an_empty_step_returns_an_empty_output():
    meta = AttentionMetadata.build([], [], [], 4, device=DEVICE)
    cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    out = triton_paged_attention(torch.zeros(0, 2, 16, device=DEVICE), cache, cache, meta, 0.25)
    assert out.shape == (0, 2, 16)


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(6, 4, 2, 16, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(6, 4, 2, 16, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(24, generator=g)[:7].to(DEVICE)
    k = torch.randn(7, 2, 16, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(7, 2, 16, generator=g).to(dtype).to(DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv(k, v, want_k, want_v, slots)
    triton_write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@kernels
def test_write_kv_skips_negative_slots():
    k_cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    v_cache = torch.zeros(2, 4, 1, 16, device=DEVICE)
    k = torch.ones(3, 1, 16, device=DEVICE)
    triton_write_kv(k, 2 * k, k_cache, v_cache, torch.tensor([5, -1, 0], device=DEVICE))
    assert k_cache.flatten(0, 1)[[0, 5]].eq(1).all() and v_cache.flatten(0, 1)[[0, 5]].eq(2).all()
    assert k_cache.sum() == 2 * 16 and v_cache.sum() == 4 * 16


@kernels
def test_bad_inputs_are_refused_with_a_reason(monkeypatch):
    q, k_cache, v_cache, meta = make_step(BATCHES["decode"], 4, 4, 4, 16)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        triton_paged_attention(q[:, :3], k_cache, v_cache, meta, 0.25)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_paged_attention(q.half(), k_cache, v_cache, meta, 0.25)
    with pytest.raises(ValueError, match="powers of two"):
        triton_paged_attention(q, k_cache, v_cache, meta, 0.25, num_splits=3)
    with pytest.raises(ValueError, match="powers of two"):
        triton_paged_attention(q, k_cache, v_cache, meta, 0.25, block_q=3)
    if DEVICE == "cpu":
        import slimlm.serve.kernels.paged_attention_triton as module
        monkeypatch.setattr(module, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_paged_attention(q, k_cache, v_cache, meta, 0.25)


@kernels
def test_the_timing_module_runs_and_checks_its_results():
    from slimlm.serve.kernels.bench_paged_attention import main

    rows = main(["--tiny", "--dtype", "float32", "--heads", "4", "--kv-heads", "2", "--device", DEVICE, "--json"])
    assert len(rows) == 3 and all(r["max_abs_err"] < 1e-4 for r in rows)


def test_importing_the_package_needs_no_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import slimlm.serve.kernels as k\n"
            "assert not k.triton_available() and not k.triton_available('cpu')\n"
            "assert k.reference is k.reference_paged_attention\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(RUNNABLE or IN_FRESH_PROCESS, reason="the kernels run in this process")
def test_rerun_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1", SLIMLM_KERNEL_TESTS_RERUN="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
