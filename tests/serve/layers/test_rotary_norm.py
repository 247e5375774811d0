"""RoPE and RMSNorm against transformers' Llama functions."""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from slimlm.serve.layers import RMSNorm, RotaryEmbedding, apply_rotary, rope_inv_freq


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
        torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
