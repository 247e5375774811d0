"""The compiled elementwise chains (serve/layers/compiled.py) against the eager ops they replace.

They run on CUDA tensors only; here Inductor's CPU backend compiles the same functions, which checks
that each traces as one graph with dynamic shapes and keeps eager's bf16 roundings (bit-identical).
"""
import pytest
import torch

from slimlm.serve.layers.compiled import capturing, compile_enabled, compiled, silu_mul_ref
from slimlm.serve.layers.norm import reference_add_rms_norm, reference_rms_norm
from slimlm.serve.layers.rotary import RotaryEmbedding, reference_rotary, rope_inv_freq


def close(a, b, dtype):
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)  # eager's intermediate roundings are emulated
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_chains_equal_the_eager_ops(dtype):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: (torch.randn(*s, generator=g) * 3).to(dtype)  # noqa: E731
    w = rand(64)
    rot = RotaryEmbedding(rope_inv_freq(64, {"rope_type": "default", "rope_theta": 10000.0}), 64, dtype)
    for n in (1, 5, 33):  # one compile serves every batch size
        x, d = rand(n, 64), rand(n, 64)
        close(compiled(reference_rms_norm)(x, w, 1e-5), reference_rms_norm(x, w, 1e-5), dtype)
        for got, want in zip(compiled(reference_add_rms_norm)(x, d, w, 1e-5), reference_add_rms_norm(x, d, w, 1e-5)):
            close(got, want, dtype)
        gate_up = rand(n, 256)
        close(compiled(silu_mul_ref)(gate_up), silu_mul_ref(gate_up), dtype)
        cos, sin = rot(torch.randint(0, 64, (n,), generator=g))
        qk = rand(n, 6, 64)
        close(compiled(reference_rotary)(qk, cos, sin), reference_rotary(qk, cos, sin), dtype)


def test_only_cuda_tensors_inside_a_capture_run_compiled(monkeypatch):
    cuda_like = type("T", (), {"is_cuda": True})()
    assert not compile_enabled(cuda_like)  # an eager step: the guards would cost more than the fusion saves
    with capturing():
        assert compile_enabled(cuda_like) and not compile_enabled(torch.zeros(2, 4))
        monkeypatch.setenv("SLIMLM_COMPILE", "0")
        assert not compile_enabled(cuda_like)
    monkeypatch.delenv("SLIMLM_COMPILE")
    assert not compile_enabled(cuda_like)
