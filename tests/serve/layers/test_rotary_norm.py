"""RoPE and RMSNorm against transformers' Llama functions."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from slimlm.serve.layers import RMSNorm, RotaryEmbedding, apply_rotary, rope_inv_freq
from slimlm.serve.layers.norm import add_rms_norm, reference_rms_norm, rms_norm
from slimlm.serve.layers.rotary import rope_write_kv


def hf_cos_sin(inv_freq, positions):
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def test_rotary_matches_hf_rotate_half_and_grows_on_demand():
    torch.manual_seed(0)
    inv_freq = rope_inv_freq(16, {"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(inv_freq, max_positions=8)
    positions = torch.tensor([0, 3, 7, 20, 41])
    cos, sin = rope(positions, max_position=41)  # beyond the 8 built: the table must grow
    assert rope.cos.shape[0] >= 42
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    hcos, hsin = hf_cos_sin(inv_freq, positions)
    # HF layout: [B, heads, T, D] with cos [B, T, D] unsqueezed at dim 1.
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hcos[None], hsin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), hq[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hk[0].transpose(0, 1), atol=0, rtol=0)


def test_linear_rope_scaling_divides_frequencies():
    base = rope_inv_freq(8, {"rope_type": "default", "rope_theta": 500.0})
    torch.testing.assert_close(rope_inv_freq(8, {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}), base / 4)


def test_rms_norm_equals_hf_in_fp32_and_bf16():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        hf = LlamaRMSNorm(48, eps=1e-5)
        hf.weight.data = torch.randn(48)
        hf = hf.to(dtype)
        x = (torch.randn(7, 48) * 3).to(dtype)
        ours = RMSNorm(hf.weight.detach().clone(), 1e-5)
        torch.testing.assert_close(reference_rms_norm(x, ours.weight, 1e-5), hf(x), atol=0, rtol=0)
        # The C kernel (where it runs) rounds where HF rounds; in fp32 its sum of squares runs in
        # another order, an ulp away.
        exact = dtype == torch.bfloat16
        torch.testing.assert_close(ours(x), hf(x), atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_add_then_the_norm(dtype, monkeypatch):
    torch.manual_seed(1)
    w = (torch.randn(64) * 0.3 + 1).to(dtype)
    x, delta = (torch.randn(5, 64) * 2).to(dtype), torch.randn(5, 64).to(dtype)
    res, normed = add_rms_norm(x, delta, w, 1e-6)
    torch.testing.assert_close(res, x + delta, atol=0, rtol=0)  # the residual add rounds as PyTorch's does
    exact = dtype == torch.bfloat16
    torch.testing.assert_close(normed, reference_rms_norm(x + delta, w, 1e-6),
                               atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)
    monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")  # the PyTorch path gives the same
    res2, normed2 = add_rms_norm(x, delta, w, 1e-6)
    torch.testing.assert_close(res2, res, atol=0, rtol=0)
    torch.testing.assert_close(normed2, normed, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)


def test_rms_norm_over_leading_dims_and_per_head_weights():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 32).bfloat16()
    w = torch.randn(32).bfloat16()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6), atol=0, rtol=0)
    per_head = torch.randn(5, 32).bfloat16()  # Qwen3's joint q|k norm: the PyTorch path
    torch.testing.assert_close(rms_norm(x, per_head, 1e-6), reference_rms_norm(x, per_head, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 70])
def test_rope_write_kv_equals_rotate_then_write(dtype, n, monkeypatch):
    heads, kv_heads, d = 6, 2, 64
    g = torch.Generator().manual_seed(n)
    rope = RotaryEmbedding(rope_inv_freq(d, {"rope_type": "default", "rope_theta": 10000.0}), 512, dtype=dtype)
    positions = torch.randint(0, 500, (n,), generator=g)
    cos, sin = rope(positions, 511)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    slots = torch.randperm(40 * 4, generator=g)[:n]
    got, want = [], []
    for out, kernels in ((got, "1"), (want, "0")):
        monkeypatch.setenv("SLIMLM_CPU_KERNELS", kernels)
        k_cache, v_cache = torch.zeros(40, 4, kv_heads, d, dtype=dtype), torch.zeros(40, 4, kv_heads, d, dtype=dtype)
        q = rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, heads)
        out += [q, k_cache, v_cache]
    for a, b in zip(got, want):  # bit-identical: the kernel rounds where the three PyTorch ops round
        torch.testing.assert_close(a, b, atol=0, rtol=0)
