"""paged_attention against the per-token reference, and the reference against dense causal attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.serve.layers import AttentionMetadata, paged_attention, reference_paged_attention, write_kv
from slimlm.serve.layers.attention import attention_kernel_for


def make_step(seqs, block_size, heads, kv_heads, head_dim=16, seed=0, dtype=torch.float32):
    """A random step: `seqs` is [(cached_tokens, new_tokens)]; blocks are handed out from a shuffled pool.

    The cache is filled with random values (standing for earlier steps' K/V, plus garbage in free
    slots); the new tokens' K/V are written by write_kv, as the model does.
    """
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    need = sum(math.ceil(s / block_size) for s in lens)
    num_blocks = need + 5
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for s in lens:
        tables.append([pool.pop() for _ in range(math.ceil(s / block_size))])
    meta = AttentionMetadata.build([n for _, n in seqs], lens, tables, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    n = sum(n for _, n in seqs)
    q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k_cache, v_cache, meta


BATCHES = {
    "decode_one": [(9, 1)],
    "decode_equal": [(6, 1), (6, 1), (6, 1)],
    "decode_ragged": [(3, 1), (17, 1), (0, 1), (8, 1)],
    "prefill_from_zero": [(0, 11), (0, 5)],
    "chunked_prefill": [(7, 6), (12, 3)],
    "mixed": [(5, 1), (0, 9), (10, 1), (13, 4), (0, 1), (2, 7)],
}


@pytest.fixture(params=["kernel", "pytorch"])
def path(request, monkeypatch):
    """Each test runs twice: decode rows through slimlm's C kernel (where it builds), and through PyTorch."""
    if request.param == "pytorch":
        monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    return request.param


def kernel_available():
    q = torch.zeros(1, 2, 16)
    return attention_kernel_for(q, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)) is not None


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_matches_reference(batch, heads, kv_heads, block_size, path):
    q, k_cache, v_cache, meta = make_step(BATCHES[batch], block_size, heads, kv_heads, seed=block_size + heads)
    scale = 16 ** -0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    ref = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The per-step plan is reused by the next layer: a second call must give the same answer.
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, meta, scale), out)


def test_paged_attention_bf16_close_to_reference(path):
    q, k_cache, v_cache, meta = make_step(BATCHES["mixed"], 4, 6, 2, dtype=torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, meta, 0.25)
    ref = reference_paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_strided_queries_like_the_model_passes_them(path):
    # The model hands over q as a view into the fused qkv output: rows are not contiguous.
    q, k_cache, v_cache, meta = make_step(BATCHES["mixed"], 4, 6, 2)
    wide = torch.cat((q, torch.randn(q.shape[0], 3, q.shape[2])), dim=1)  # [N, H + 3, D]
    out = paged_attention(wide[:, :6], k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(out, reference_paged_attention(q, k_cache, v_cache, meta, 0.25), atol=1e-5, rtol=1e-5)


def test_reference_equals_dense_causal_attention():
    # One sequence prefilled from scratch: paging must be invisible, so the reference must equal
    # plain causal attention on the unpaged q/k/v (GQA by repeating KV heads).
    torch.manual_seed(0)
    t, h, kvh, d, bs = 10, 6, 2, 8, 3
    q, k, v = torch.randn(t, h, d), torch.randn(t, kvh, d), torch.randn(t, kvh, d)
    meta = AttentionMetadata.build([t], [t], [[4, 0, 7, 2]], bs)
    k_cache, v_cache = torch.zeros(8, bs, kvh, d), torch.zeros(8, bs, kvh, d)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(h // kvh, 1).transpose(0, 1),
        v.repeat_interleave(h // kvh, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(reference_paged_attention(q, k_cache, v_cache, meta, d ** -0.5), dense,
                               atol=1e-5, rtol=1e-5)


def test_build_slot_mapping_and_write_kv():
    # Sequence 0: 5 cached + 2 new tokens in blocks [3, 1] of 4 -> positions 5, 6 -> slots 1*4+1, 1*4+2.
    # Sequence 1: 0 cached + 3 new in block [2] -> slots 8, 9, 10.
    meta = AttentionMetadata.build([2, 3], [7, 3], [[3, 1], [2]], 4)
    assert meta.slot_mapping.tolist() == [5, 6, 8, 9, 10]
    assert meta.query_start_loc.tolist() == [0, 2, 5]
    assert meta.block_tables.tolist() == [[3, 1], [2, 0]]
    assert meta.last_token_indices.tolist() == [1, 4]
    assert not meta.is_decode_only and meta.max_seq_len == 7
    k_cache, v_cache = torch.zeros(4, 4, 1, 2), torch.zeros(4, 4, 1, 2)
    k = torch.arange(1, 11, dtype=torch.float32).view(5, 1, 2)
    write_kv(k, -k, k_cache, v_cache, meta.slot_mapping)
    flat = k_cache.view(-1, 1, 2)
    torch.testing.assert_close(flat[[5, 6, 8, 9, 10]], k)
    torch.testing.assert_close(v_cache.view(-1, 1, 2)[[5, 6, 8, 9, 10]], -k)
    assert flat.abs().sum() == k.sum()  # nothing else written


def test_host_lists_derived_when_left_out():
    built = AttentionMetadata.build([1, 4], [6, 4], [[0, 1], [2]], 4)
    bare = AttentionMetadata(built.slot_mapping, built.query_start_loc, built.seq_lens, built.block_tables, 4)
    assert bare.query_lens == [1, 4] and bare.seq_lens_list == [6, 4]


def test_block_table_too_short_is_an_error():
    with pytest.raises(ValueError, match="needs 3 blocks"):
        AttentionMetadata.build([9], [9], [[0, 1]], 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 8, 2), (32, 4, 4)])
def test_decode_kernel_long_ragged_contexts(dtype, head_dim, heads, kv_heads, monkeypatch):
    # Real head sizes and contexts of many blocks (the kernel prefetches blocks ahead): the C kernel
    # against the float64 reference and against the PyTorch path it replaces.
    if not kernel_available():
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    seqs = [(300, 1), (17, 1), (0, 1), (129, 1), (64, 1)]
    q, k_cache, v_cache, meta = make_step(seqs, 16, heads, kv_heads, head_dim=head_dim, dtype=dtype, seed=7)
    assert attention_kernel_for(q, k_cache, v_cache) is not None
    scale = head_dim ** -0.5
    out = paged_attention(q, k_cache, v_cache, meta, scale)
    ref = reference_paged_attention(q.double(), k_cache.double(), v_cache.double(), meta, scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    plain = paged_attention(q, k_cache, v_cache, meta, scale)  # same step, same plan: now the PyTorch path
    torch.testing.assert_close(out.double(), plain.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_alone_gives_the_bits_it_gives_in_a_batch(dtype, monkeypatch):
    # Fewer rows than threads: the kernel splits a row's KV heads (each with its query heads) between
    # threads; with more rows, each row is one unit. Each head's arithmetic is the same either way, so a
    # row's output is the same bits alone or in a batch.
    if not kernel_available():
        pytest.skip("slimlm's C kernels do not build here")
    seqs = [(200, 1), (45, 1), (97, 1)]
    q, k_cache, v_cache, meta = make_step(seqs, 16, 9, 3, head_dim=64, dtype=dtype, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = paged_attention(q, k_cache, v_cache, meta, 0.125)
        for i, (cached, new) in enumerate(seqs):
            one = AttentionMetadata.build([new], [cached + new], [meta.block_tables[i].tolist()], 16)
            alone = paged_attention(q[i:i + 1], k_cache, v_cache, one, 0.125)
            assert torch.equal(alone[0], batch[i]), f"row {i}"
    finally:
        torch.set_num_threads(before)


def test_decode_kernel_refuses_block_ids_outside_the_cache():
    if not kernel_available():
        pytest.skip("slimlm's C kernels do not build here")
    q, k_cache, v_cache, meta = make_step([(9, 1)], 4, 4, 2)
    meta.block_tables[0, 1] = k_cache.shape[0]  # one past the end: the kernel would read out of bounds
    with pytest.raises(ValueError, match="outside the cache"):
        paged_attention(q, k_cache, v_cache, meta, 0.25)


def test_kernel_rounds_like_pytorch_flash_attention_in_bf16():
    # The kernel's softmax follows PyTorch's CPU flash attention (what HF's SDPA path runs): on the
    # same bf16 inputs, outputs agree bit for bit but for ~5% of the elements (summation order in the
    # dot products), where a float32 softmax differs in ~33% of them.
    if not kernel_available():
        pytest.skip("slimlm's C kernels do not build here")
    g = torch.Generator().manual_seed(0)
    t, h, kvh, d = 64, 6, 2, 64
    q, k, v = (torch.randn(n, t, d, generator=g).bfloat16() for n in (h, kvh, kvh))
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
    meta = AttentionMetadata.build([t], [t], [[3, 0, 2, 1]], 16)
    k_cache, v_cache = torch.zeros(4, 16, kvh, d).bfloat16(), torch.zeros(4, 16, kvh, d).bfloat16()
    write_kv(k.transpose(0, 1), v.transpose(0, 1), k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q.transpose(0, 1).contiguous(), k_cache, v_cache, meta, d ** -0.5).transpose(0, 1)
    assert (out != ref).float().mean() < 0.1
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
