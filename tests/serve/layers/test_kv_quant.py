"""The int8 KV cache: write/read round trips bounded by the scale, scale growth and reset, block
copies, and paged attention over it against the reference (on the dequantized cache and on fp32)."""
import math

import pytest
import torch

from slimlm.serve.layers import AttentionMetadata, QuantizedKV, paged_attention, reference_paged_attention, write_kv
from slimlm.serve.layers.attention import attention_kernel_for
from slimlm.serve.layers.kv_quant import (copy_blocks_, gather_slots, kv_block_bytes, quantize_write,
                                          resolve_kv_dtype)
from slimlm.serve.layers.rotary import _kernel_for as rope_kernel_for, apply_rotary, rope_write_kv

C_KERNELS = attention_kernel_for(torch.zeros(1, 4, 16), torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)) is not None
BATCHES = {
    "decode_ragged": [(3, 1), (17, 1), (0, 1), (8, 1)],
    "prefill_from_zero": [(0, 11), (0, 5)],
    "chunked_prefill": [(7, 6), (12, 3)],
    "mixed": [(5, 1), (0, 9), (10, 1), (13, 4), (0, 1), (2, 7)],
}


@pytest.fixture(params=["kernels-on", "kernels-off"])
def path(request, monkeypatch):
    """With the C kernels on, int8 caches are read by the C attention kernel (where it builds); off, by PyTorch."""
    if request.param == "kernels-off":
        monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    return request.param


def make_step(seqs, block_size, heads, kv_heads, head_dim=16, seed=0, dtype=torch.float32):
    """A random step over float caches (as in test_attention): `seqs` is [(cached, new)], shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    num_blocks = sum(math.ceil(s / block_size) for s in lens) + 5
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[pool.pop() for _ in range(math.ceil(s / block_size))] for s in lens]
    meta = AttentionMetadata.build([n for _, n in seqs], lens, tables, block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(sum(n for _, n in seqs), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, meta


def quantize_step(k_cache, v_cache):
    """Int8 copies of float caches, written slot by slot in position order as decode would."""
    nb, bs, kvh, d = k_cache.shape
    qk, qv = QuantizedKV.zeros(k_cache.shape), QuantizedKV.zeros(v_cache.shape)
    for off in range(bs):  # every block at once, one offset per "step": scales grow as they would
        slots = torch.arange(nb) * bs + off
        write_kv(k_cache[:, off], v_cache[:, off], qk, qv, slots)
    return qk, qv


def test_one_write_round_trips_within_half_a_scale():
    g = torch.Generator().manual_seed(0)
    cache = QuantizedKV.zeros((6, 4, 3, 16))
    x = torch.randn(24, 3, 16, generator=g) * torch.tensor([0.1, 1.0, 30.0])[None, :, None]  # per-head ranges
    slots = torch.randperm(24, generator=g)  # any order: grouping by block does not assume sorted slots
    quantize_write(x, cache, slots)
    got = gather_slots(cache, slots, torch.float32)
    blocks = slots // 4
    for b in range(6):
        rows = blocks == b
        torch.testing.assert_close(cache.scale[b], x[rows].abs().amax(dim=(0, 2)) / 127)
    bound = cache.scale[blocks][:, :, None] / 2 * (1 + 1e-5)  # [N, KVH, 1]
    assert ((got - x).abs() <= bound).all()
    assert cache.data.abs().max() == 127


def test_growing_scale_rerounds_within_the_documented_bound():
    # One token at a time into one block, each 1.1x larger than the last: the scale must grow again
    # and again, by at least 1.25x each time, re-quantizing the block. An entry is off by at most
    # half the sum of the scales it was rounded at (<= 2.5x the final scale).
    g = torch.Generator().manual_seed(1)
    bs, kvh, d = 16, 2, 32
    cache = QuantizedKV.zeros((3, bs, kvh, d))
    xs, history = [], []
    for t in range(bs):
        x = torch.randn(1, kvh, d, generator=g)
        x = x / x.abs().amax(-1, keepdim=True) * 1.1 ** t  # max-abs 1.1^t in every head
        quantize_write(x, cache, torch.tensor([bs + t]))  # block 1
        xs.append(x[0])
        history.append(cache.scale[1].clone())
    x = torch.stack(xs)                                    # [T, KVH, D]
    scales = torch.stack(history)                          # [T, KVH]: scale after each write
    need = 1.1 ** torch.arange(bs)[:, None] / 127          # [T, 1]: the running max-abs / 127
    assert (scales >= need * (1 - 1e-6)).all()             # never clips
    assert scales[0].allclose(need[0].expand(kvh))         # a fresh block starts at exactly its max
    ratio = scales[1:] / scales[:-1]
    grew = ratio > 1
    assert grew.sum() >= 4 * kvh and (ratio[grew] >= 1.25 * (1 - 1e-6)).all()
    err = (cache.dequantize()[1] - x).abs().amax(dim=-1)   # [T, KVH]
    for t in range(bs):
        lived = scales[t] + (scales[t + 1:] * grew[t:]).sum(0)  # the scales entry t was rounded at
        assert (err[t] <= lived / 2 * (1 + 1e-5)).all()
    assert (err <= 2.5 * scales[-1] * (1 + 1e-5)).all()
    # Written as one prefill chunk, the same tokens are rounded once, at exactly their max.
    once = QuantizedKV.zeros((3, bs, kvh, d))
    quantize_write(x, once, torch.arange(bs, 2 * bs))
    torch.testing.assert_close(once.scale[1], need[-1].expand(kvh))
    assert ((once.dequantize()[1] - x).abs() <= once.scale[1][None, :, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(cache.scale[0], torch.zeros(kvh)) and torch.equal(cache.scale[2], torch.zeros(kvh))


def test_a_decode_sequence_stays_close():
    # Real-looking traffic: unit-scale keys one at a time over several blocks.
    g = torch.Generator().manual_seed(2)
    bs, kvh, d, t = 8, 3, 64, 40
    cache = QuantizedKV.zeros((5, bs, kvh, d))
    x = torch.randn(t, kvh, d, generator=g)
    for i in range(t):
        quantize_write(x[i:i + 1], cache, torch.tensor([i]))
    got = gather_slots(cache, torch.arange(t), torch.float32)
    rel = (got - x).norm() / x.norm()
    assert rel < 0.02, rel


def test_a_reused_block_restarts_its_scale():
    cache = QuantizedKV.zeros((2, 4, 1, 8))
    quantize_write(torch.full((4, 1, 8), 1000.0), cache, torch.arange(4, 8))  # block 1, large
    assert cache.scale[1, 0] == pytest.approx(1000 / 127)
    small = torch.linspace(-0.01, 0.01, 8).view(1, 1, 8)
    quantize_write(small, cache, torch.tensor([4]))  # slot 0 of block 1: a new owner
    assert cache.scale[1, 0] == pytest.approx(0.01 / 127)
    torch.testing.assert_close(gather_slots(cache, torch.tensor([4]), torch.float32), small,
                               atol=0.01 / 254 + 1e-9, rtol=0)
    # A later slot of the same block continues from that scale (it is the same owner).
    quantize_write(small / 2, cache, torch.tensor([5]))
    assert cache.scale[1, 0] == pytest.approx(0.01 / 127)


def test_zeros_stay_zero_and_finite():
    cache = QuantizedKV.zeros((2, 4, 2, 8))
    quantize_write(torch.zeros(3, 2, 8), cache, torch.tensor([0, 1, 2]))
    assert torch.equal(cache.scale, torch.zeros(2, 2))
    out = gather_slots(cache, torch.arange(8), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.zeros(8, 2, 8, dtype=torch.bfloat16))


def test_block_copies_carry_their_scales():
    g = torch.Generator().manual_seed(3)
    cache = QuantizedKV.zeros((4, 4, 2, 8))
    quantize_write(torch.randn(8, 2, 8, generator=g) * 5, cache, torch.arange(8))  # blocks 0, 1
    before = cache.dequantize()
    copy_blocks_(cache, torch.tensor([0, 1]), torch.tensor([3, 2]))
    after = cache.dequantize()
    torch.testing.assert_close(after[3], before[0], atol=0, rtol=0)
    torch.testing.assert_close(after[2], before[1], atol=0, rtol=0)
    plain = torch.randn(4, 4, 2, 8, generator=g)
    copy_blocks_(plain, torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(plain[1], plain[0])


def test_block_bytes_and_dtype_names():
    # SmolLM2 shapes: 30 layers, 3 KV heads of 64, blocks of 16.
    fp32, bf16, int8 = (kv_block_bytes(30, 16, 3, 64, dt) for dt in (torch.float32, torch.bfloat16, torch.int8))
    assert int8 == 2 * 30 * (16 * 3 * 64 + 3 * 4)
    assert 1.98 < bf16 / int8 < 2.0 and 3.96 < fp32 / int8 < 4.0
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("int8", torch.float32) == torch.int8
    with pytest.raises(ValueError, match="auto, int8"):
        resolve_kv_dtype("fp8", torch.float32)


def test_attention_kernel_reads_int8_and_rope_only_one_token_per_block():
    q = torch.zeros(1, 4, 32)
    qk = QuantizedKV.zeros((2, 4, 2, 32))
    plain = torch.zeros(2, 4, 2, 32)
    if attention_kernel_for(q, plain, plain) is not None:  # the C kernels build here
        assert attention_kernel_for(q, qk, qk).__name__ == "slimlm_decode_attention_kv8"
        assert attention_kernel_for(q.bfloat16(), qk, qk).__name__ == "slimlm_decode_attention_kv8"
    assert attention_kernel_for(q, qk, plain) is None  # one int8 and one float cache: no kernel
    qkv = torch.zeros(1, 8 * 32)
    cos, sin = torch.zeros(1, 1, 32), torch.zeros(1, 1, 32)
    assert rope_kernel_for(qkv, cos, sin, qk, qk, torch.zeros(1, dtype=torch.long), 4) is None  # maybe 2 per block
    with pytest.raises(ValueError, match="both"):
        write_kv(torch.zeros(1, 2, 32), torch.zeros(1, 2, 32), qk, torch.zeros(2, 4, 2, 32), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_writes_in_c_store_the_bytes_pytorch_stores(dtype, path):
    # One token per block per step (decode): the C store (rope_write_kv_q8) and quantize_write give the
    # same int8 data and scales, step after step, through fresh blocks, growing scales and re-rounding.
    g = torch.Generator().manual_seed(7)
    h, kvh, d, bs, seqs = 4, 2, 32, 4, 3
    tables = [[5, 1, 8], [0, 6, 3], [2, 7, 4]]
    caches = [(QuantizedKV.zeros((9, bs, kvh, d)), QuantizedKV.zeros((9, bs, kvh, d))) for _ in range(2)]
    for pos in range(3 * bs):
        slots = torch.tensor([t[pos // bs] * bs + pos % bs for t in tables])
        # growing magnitudes, so scales grow and blocks re-round; a spike now and then
        qkv = (torch.randn(seqs, (h + 2 * kvh) * d, generator=g) * (1 + pos / 3) * (3 if pos % 5 == 2 else 1)).to(dtype)
        ang = torch.randn(seqs, 1, d // 2, generator=g)
        cos, sin = torch.cat((ang.cos(), ang.cos()), -1).to(dtype), torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
        if pos == 0:
            c_store = rope_kernel_for(qkv, cos, sin, *caches[0], slots, h, True)
            assert (c_store is not None) == (path == "kernels-on" and C_KERNELS)
        outs = [rope_write_kv(qkv, cos, sin, k, v, slots, h, one_token_per_block=fast)
                for (k, v), fast in zip(caches, (True, False))]
        torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    (ck, cv), (pk, pv) = caches
    for got, want in ((ck, pk), (cv, pv)):
        assert torch.equal(got.scale, want.scale) and torch.equal(got.data, want.data)
    assert (pk.scale > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_quantizes_what_the_float_path_writes(dtype, path):
    g = torch.Generator().manual_seed(4)
    n, h, kvh, d = 5, 4, 2, 32
    qkv = torch.randn(n, (h + 2 * kvh) * d, generator=g).to(dtype)
    ang = torch.randn(n, 1, d // 2, generator=g)
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1).to(dtype), torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    slots = torch.tensor([3, 4, 5, 9, 0])
    qk, qv = QuantizedKV.zeros((3, 4, kvh, d)), QuantizedKV.zeros((3, 4, kvh, d))
    q = rope_write_kv(qkv, cos, sin, qk, qv, slots, h)
    parts = qkv.view(n, h + 2 * kvh, d)
    rotated = apply_rotary(parts[:, :h + kvh], cos, sin)
    rk, rv = QuantizedKV.zeros((3, 4, kvh, d)), QuantizedKV.zeros((3, 4, kvh, d))
    write_kv(rotated[:, h:], parts[:, h + kvh:], rk, rv, slots)
    torch.testing.assert_close(q, rotated[:, :h])
    for got, want in ((qk, rk), (qv, rv)):
        assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_int8_equals_reference_on_dequantized_cache(batch, heads, kv_heads, block_size, path):
    q, k_cache, v_cache, meta = make_step(BATCHES[batch], block_size, heads, kv_heads, seed=block_size + heads)
    qk, qv = quantize_step(k_cache, v_cache)
    assert (attention_kernel_for(q, qk, qv) is None) == (path == "kernels-off" or not C_KERNELS)
    scale = 16 ** -0.5
    out = paged_attention(q, qk, qv, meta, scale)
    # Exact up to float rounding: the same attention over the values the int8 cache stands for ...
    ref = reference_paged_attention(q, qk.dequantize(), qv.dequantize(), meta, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_paged_attention(q, qk, qv, meta, scale), ref)  # takes QuantizedKV too
    # ... and close to attention over the float cache it was quantized from.
    exact = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    assert (out - exact).abs().max() < 0.05
    assert (out - exact).norm() / exact.norm() < 0.02


def test_paged_attention_int8_bf16_queries(path):
    q, k_cache, v_cache, meta = make_step(BATCHES["mixed"], 4, 6, 2, dtype=torch.bfloat16)
    qk, qv = quantize_step(k_cache, v_cache)
    out = paged_attention(q, qk, qv, meta, 0.25)
    assert out.dtype == torch.bfloat16
    ref = reference_paged_attention(q, qk, qv, meta, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_prefill_chunk_then_decode_through_write_kv():
    # The model's order: write the step's K/V, then attend. Chunked prefill followed by decode steps
    # over an int8 cache stays close to the same steps over an fp32 cache.
    g = torch.Generator().manual_seed(5)
    h, kvh, d, bs = 4, 2, 16, 4
    table = [5, 2, 7, 0, 3]
    fk, fv = torch.zeros(8, bs, kvh, d), torch.zeros(8, bs, kvh, d)
    qk, qv = QuantizedKV.zeros(fk.shape), QuantizedKV.zeros(fv.shape)
    done = 0
    for chunk in (6, 5, 1, 1, 1, 1, 1):
        meta = AttentionMetadata.build([chunk], [done + chunk], [table], bs)
        q = torch.randn(chunk, h, d, generator=g)
        k, v = torch.randn(chunk, kvh, d, generator=g), torch.randn(chunk, kvh, d, generator=g)
        write_kv(k, v, fk, fv, meta.slot_mapping)
        write_kv(k, v, qk, qv, meta.slot_mapping)
        out = paged_attention(q, qk, qv, meta, d ** -0.5)
        want = paged_attention(q, fk, fv, meta, d ** -0.5)
        assert (out - want).abs().max() < 0.05
        done += chunk
