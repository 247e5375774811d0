"""GPTQ against RTN on the output error, against a naive OBS reference, and its act-order / g_idx layout."""
import pytest
import torch

from slimlm.toolkit.quant.gptq import Hessian, gptq_quantize
from slimlm.toolkit.quant.rtn import group_params, rtn_quantize
from slimlm.toolkit.quant.scheme import QuantScheme


def correlated_inputs(n, d, seed):
    """Inputs with correlated channels and a few large ones (as in real activations); the channel
    mixing is fixed per width, so different seeds draw from one distribution."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(d)) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix  # [n, d]
    x[:, :4] *= 8
    return x


def hessian_of(x):
    h = Hessian(x.shape[1])
    h.add(x)
    return h.matrix()


def output_error(x, w, q):
    return ((x @ w.T - x @ q.T).norm() / (x @ w.T).norm()).item()


SCHEMES = [QuantScheme(bits=4, group_size=32, sym=True),
           QuantScheme(bits=4, group_size=64, sym=False),
           QuantScheme(bits=4, group_size=-1, sym=True),
           QuantScheme(bits=4, group_size=32, sym=True, act_order=True),
           QuantScheme(bits=4, group_size=32, sym=False, act_order=True, static_groups=True),
           QuantScheme(bits=8, group_size=64, sym=True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.bits}b-g{s.group_size}-{'sym' if s.sym else 'asym'}"
                         f"{'-act' if s.act_order else ''}{'-static' if s.static_groups else ''}")
def test_gptq_output_error_is_lower_than_rtn(scheme):
    torch.manual_seed(0)
    x = correlated_inputs(2048, 128, seed=1)
    w = torch.randn(64, 128) * 0.1
    held_out = correlated_inputs(1024, 128, seed=2)  # same distribution, not calibrated on
    rtn = rtn_quantize(w, scheme).dequantize()
    gptq = gptq_quantize(w, hessian_of(x), scheme, block_size=32).dequantize()
    assert output_error(x, w, gptq) < 0.8 * output_error(x, w, rtn)
    assert output_error(held_out, w, gptq) < 0.8 * output_error(held_out, w, rtn)


def test_gptq_with_isotropic_hessian_is_rtn():
    # H = c*I: no column's error can be compensated on another, so GPTQ must round like RTN.
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    for scheme in (QuantScheme(group_size=32, sym=False), QuantScheme(group_size=-1, sym=True)):
        g = gptq_quantize(w, 3.0 * torch.eye(128), scheme, block_size=32)
        r = rtn_quantize(w, scheme)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)


def naive_gptq(w, H, scheme, damp):
    """Column-by-column OBS with an explicitly updated inverse Hessian, in float64: no Cholesky,
    no blocks. Returns codes [out, in] in the original column order."""
    d = w.shape[1]
    W, H = w.double().clone(), H.double().clone()
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else torch.arange(d)
    length = d if scheme.group_size == -1 else scheme.group_size
    static = scheme.group_size == -1 or scheme.static_groups
    if static:
        s_all, z_all = group_params(W.reshape(W.shape[0], -1, length), scheme)  # [out, G]
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(d, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(W.shape, dtype=torch.long)
    for j in range(d):
        if static:
            g = int(perm[j]) // length
            s, z = s_all[:, g].double(), z_all[:, g].double()
        elif j % length == 0:
            s, z = (t.double() for t in group_params(W[:, j:j + length], scheme))
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, scheme.maxq)
        codes[:, j] = q.long()
        err = (W[:, j] - s * (q - z)) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # drop j: Schur complement
    return codes[:, torch.argsort(perm)]


@pytest.mark.parametrize("scheme", SCHEMES[:5], ids=["sym", "asym-g64", "per-channel", "act", "act-static"])
def test_blocked_cholesky_gptq_matches_naive_obs(scheme):
    torch.manual_seed(4)
    x = correlated_inputs(1024, 128, seed=5)
    w = torch.randn(24, 128) * 0.1
    H = hessian_of(x)
    got = gptq_quantize(w, H, scheme, damp=0.01, block_size=32, dtype=torch.float64)  # 4 lazy blocks
    want = naive_gptq(w, H, scheme, damp=0.01)
    assert torch.equal(got.codes.long(), want)


def test_act_order_without_static_groups_records_g_idx():
    torch.manual_seed(6)
    x = correlated_inputs(1024, 128, seed=7)
    x[:, 100] *= 20  # the most active input: quantized first, so it lands in group 0
    H = hessian_of(x)
    w = torch.randn(16, 128)
    qw = gptq_quantize(w, H, QuantScheme(group_size=32, act_order=True), block_size=64)
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    assert qw.g_idx.dtype == torch.int32 and qw.g_idx.shape == (128,)
    assert qw.g_idx[100] == 0
    # Group k holds exactly the k-th run of 32 columns in processing order.
    for k in range(4):
        assert sorted(torch.nonzero(qw.g_idx == k).flatten().tolist()) == sorted(order[32 * k: 32 * (k + 1)].tolist())
    assert qw.scales.shape == qw.zeros.shape == (16, 4)
    g = qw.g_idx.long()
    assert torch.equal(qw.dequantize(), qw.scales[:, g] * (qw.codes.float() - qw.zeros[:, g].float()))
    static = gptq_quantize(w, H, QuantScheme(group_size=32, act_order=True, static_groups=True))
    assert torch.equal(static.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_dead_inputs_are_zeroed():
    torch.manual_seed(8)
    x = correlated_inputs(512, 64, seed=9)
    x[:, 7] = 0.0
    qw = gptq_quantize(torch.randn(8, 64), hessian_of(x), QuantScheme(group_size=32))
    assert (qw.dequantize()[:, 7] == 0).all()


def test_hessian_accumulates_2_xtx_over_n():
    torch.manual_seed(10)
    x = torch.randn(3, 1500, 48)
    h = Hessian(48)
    h.add(x[0])
    h.add(x[1:])  # [2, 1500, 48]: every leading index is a token
    flat = x.reshape(-1, 48).double()
    assert h.tokens == 4500
    torch.testing.assert_close(h.matrix().double(), 2 * flat.T @ flat / 4500, rtol=1e-5, atol=1e-5)
    fast = Hessian(48, fast=True)
    fast.add(x.bfloat16())
    exact = x.bfloat16().reshape(-1, 48).double()
    torch.testing.assert_close(fast.matrix().double(), 2 * exact.T @ exact / 4500, rtol=2e-2, atol=2e-2)


def test_indefinite_hessian_escalates_dampening_with_a_warning():
    H = torch.ones(16, 16) + torch.eye(16)  # positive definite ...
    H[0, 1] = H[1, 0] = 5.0  # ... no longer: [[2, 5], [5, 2]] has eigenvalue -3
    with pytest.warns(UserWarning, match="not positive definite"):
        qw = gptq_quantize(torch.randn(8, 16), H, QuantScheme(group_size=-1))
    assert qw.codes.shape == (8, 16)


def test_without_escalation_an_indefinite_hessian_raises():
    from slimlm.toolkit.quant.gptq import NotPositiveDefinite

    with pytest.raises(NotPositiveDefinite):
        gptq_quantize(torch.randn(8, 16), -torch.eye(16) + 0.5, QuantScheme(group_size=-1), escalate=False)


def test_gptq_with_mse_clip_and_isotropic_hessian_is_clipped_rtn():
    # The clipping search chooses each group's grid when GPTQ reaches it: with nothing to compensate
    # (H = c*I) the result must be RTN's with the same search, and differ from the unclipped grids.
    torch.manual_seed(4)
    w = torch.randn(32, 128) ** 3  # heavy tails: clipping pays
    for scheme in (QuantScheme(group_size=32, sym=False, mse_clip=True), QuantScheme(group_size=64, sym=True, mse_clip=True)):
        g = gptq_quantize(w, 3.0 * torch.eye(128), scheme, block_size=32)
        r = rtn_quantize(w, scheme)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)
        plain = rtn_quantize(w, QuantScheme(group_size=scheme.group_size, sym=scheme.sym))
        assert not torch.equal(g.scales, plain.scales)


@pytest.mark.parametrize("width", [1, 5, 48, 130])
def test_gram_from_the_upper_blocks_equals_the_full_product(width):
    from slimlm.toolkit.quant.gptq import _add_gram

    x = torch.randn(300, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    out = torch.full((width, width), 1.5, dtype=torch.float64)
    _add_gram(out, x)
    torch.testing.assert_close(out, 1.5 + x.T @ x, rtol=1e-12, atol=1e-12)


def test_float32_hessian_of_bf16_inputs_is_exact_and_the_fast_one_is_not():
    """bf16 inputs: the float32 path casts up before multiplying (exact up to float32 sums); the fast path
    rounds each chunk's product to bf16, so it is measurably further from the exact Hessian."""
    x = correlated_inputs(4096, 96, seed=12).bfloat16()
    exact = 2 * x.double().T @ x.double() / 4096
    errors = {}
    for fast in (False, True):
        h = Hessian(96, fast=fast)
        h.add(x)
        errors[fast] = ((h.matrix().double() - exact).norm() / exact.norm()).item()
        assert h.rounded == fast
    assert errors[False] < 1e-6 < 1e-4 < errors[True]
