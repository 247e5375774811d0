"""QuantScheme validation, RTN against hand-computed grids, and fake-quant's straight-through gradient."""
import pytest
import torch

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.quant.fake_quant import fake_quant
from slimlm.toolkit.quant.rtn import group_params, rtn_dequantize, rtn_quantize
from slimlm.toolkit.quant.scheme import QuantScheme


def fp16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float16).item()


def fp16_up(x: float) -> float:
    """The least float16 value >= x: a scale is rounded up, so a group's range stays on its grid."""
    v = torch.tensor(x, dtype=torch.float16)
    return (v if v.item() >= x else v.view(torch.int16).add(1).view(torch.float16)).item()


# ------------------------------------------------------------------ scheme

@pytest.mark.parametrize("kwargs, needle", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group_size=48), "group size"),
    (dict(group_size=64.0), "got 64.0"),  # equal to 64, but a float reshape fails deep inside
    (dict(bits=4.0), "bits must be 4 or 8, got 4.0"),
    (dict(scale_dtype="float32"), "scale dtype"),
    (dict(static_groups=True), "needs act_order"),
    (dict(skip=("lm_head(",)), "not a valid regular expression"),
])
def test_scheme_refuses_bad_fields(kwargs, needle):
    with pytest.raises(SlimlmError, match=needle):
        QuantScheme(**kwargs)


def test_scheme_normalises_and_derives():
    s = QuantScheme(bits=4, group_size=64, scale_dtype="bf16", skip="lm_head")
    assert s.scale_dtype == "bfloat16" and s.torch_scale_dtype == torch.bfloat16
    assert s.skip == ("lm_head",)
    assert (s.maxq, s.sym_zero, s.pack_factor) == (15, 8, 8)
    assert (QuantScheme(bits=8).maxq, QuantScheme(bits=8).sym_zero, QuantScheme(bits=8).pack_factor) == (255, 128, 4)
    assert s.groups(576) == 9 and QuantScheme(group_size=-1).groups(576) == 1
    assert QuantScheme() == QuantScheme(scale_dtype="fp16")


def test_default_skip_keeps_head_and_embeddings():
    s = QuantScheme()
    assert s.is_skipped("lm_head") and s.is_skipped("model.embed_tokens")
    assert not s.is_skipped("model.layers.0.mlp.down_proj")
    assert QuantScheme(skip=(r"layers\.1\.",)).is_skipped("model.layers.1.self_attn.q_proj")


def test_check_layer_names_the_layer_and_sizes():
    s = QuantScheme(group_size=64)
    with pytest.raises(SlimlmError, match=r"model\.layers\.0\.mlp\.down_proj has in_features=96.*group size 64"):
        s.check_layer("model.layers.0.mlp.down_proj", 64, 96)
    QuantScheme(group_size=32).check_layer("x", 64, 96)  # 96 = 3 groups of 32
    QuantScheme(group_size=-1).check_layer("x", 64, 96)
    with pytest.raises(SlimlmError, match="out_features=36.*not divisible by 8"):
        QuantScheme(group_size=-1).check_layer("x", 36, 64)
    QuantScheme(bits=8, group_size=-1).check_layer("x", 36, 64)  # 4 codes per int32 at 8 bits


# ------------------------------------------------------------------ RTN, hand-computed

def one_group(values, n=32):
    w = torch.zeros(1, n)
    w[0, : len(values)] = torch.tensor(values)
    return w


def test_rtn_symmetric_grid_by_hand():
    qw = rtn_quantize(one_group([-0.75, 0.3, 0.75]), QuantScheme(bits=4, group_size=32, sym=True))
    # 0.1 in float16, rounded up: to nearest (0.0999756) 0.75 would sit at 7.5018 steps, clipped to 7 more than half
    # a step away; at 0.1000366 every weight is within half a step of the grid
    s = 0.10003662109375
    assert fp16(2 * 0.75 / 15) < 0.1 < s and qw.scales.item() == s and qw.zeros.item() == 8
    # -0.75/s = -7.4973 -> -7 (+8) = 1;  0.3/s = 2.9989 -> 3 (+8) = 11;  0.75/s = 7.4973 -> 7 (+8) = 15
    assert qw.codes[0, :4].tolist() == [1, 11, 15, 8]
    deq = qw.dequantize()[0, :4].tolist()
    assert deq == [s * -7, s * 3, s * 7, 0.0]


def test_rtn_asymmetric_grid_by_hand():
    qw = rtn_quantize(one_group([-0.3, 1.2]), QuantScheme(bits=4, group_size=32, sym=False))
    s = fp16_up(1.5 / 15)
    assert qw.scales.item() == s and qw.zeros.item() == 3  # round(0.3 / s) = round(2.9989)
    assert qw.codes[0, :3].tolist() == [0, 15, 3]  # -3+3, round(11.996)+3, 0+3


def test_rtn_asymmetric_never_uses_zero_point_0():
    # All weights >= 0: the plain rule gives zero point 0, which GPTQ v1 cannot store.
    qw = rtn_quantize(one_group([0.2, 1.0]), QuantScheme(bits=4, group_size=32, sym=False))
    s = fp16_up(1.0 / 14)
    assert qw.zeros.item() == 1 and qw.scales.item() == s
    assert qw.codes[0, :3].tolist() == [4, 15, 1]  # round(2.8)+1, round(14.0)+1, 0+1
    assert qw.dequantize()[0, 2].item() == 0.0


@pytest.mark.parametrize("bits, group, sym, scales", [(4, 32, True, "float16"), (4, 64, False, "float16"),
                                                      (8, 128, True, "float16"), (8, -1, False, "float16"),
                                                      (4, -1, True, "float16"), (8, 64, False, "bf16"),
                                                      (8, 32, True, "bf16")])
def test_rtn_error_is_at_most_half_a_step(bits, group, sym, scales):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1)
    w[:, 5] = 0.0
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym, scale_dtype=scales)
    qw = rtn_quantize(w, scheme)
    n_groups = 1 if group == -1 else 256 // group
    assert qw.codes.shape == (48, 256) and qw.scales.shape == qw.zeros.shape == (48, n_groups)
    assert int(qw.codes.max()) <= scheme.maxq
    assert torch.equal(qw.g_idx, torch.arange(256, dtype=torch.int32) // (256 if group == -1 else group))
    step = qw.scales[:, qw.g_idx.long()]  # [out, in]
    deq = qw.dequantize()
    err = (deq - w).abs()
    # The nearest grid point, at the grid's ends too: the scale is rounded up to float16 (to nearest, an int8
    # group's extreme weight was up to 0.6 steps off, 1.4 with bf16 scales)
    assert (err <= step / 2 * (1 + 1e-6)).all()
    assert (deq[:, 5] == 0).all()  # zero is on every grid
    stored = qw.scales.half() if scales == "float16" else qw.scales.bfloat16()
    assert torch.equal(stored.float(), qw.scales)  # exactly storable in the scale dtype


def test_small_weights_keep_their_grid_with_float16_scales():
    """Scales were floored at float16's smallest normal value (6.1e-5): a group of weights near 1e-5 became 99.8%
    zeros. float16's subnormals down to 6e-8 are scales like any other."""
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 1e-5
    deq = rtn_quantize(w, QuantScheme(bits=4, group_size=32, sym=True)).dequantize()
    assert ((deq - w).norm() / w.norm()).item() < 0.15 and (deq == 0).float().mean().item() < 0.2


def test_group_params_are_per_group():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25]])  # two groups of 2
    scale, zero = group_params(w.view(1, 2, 2), QuantScheme(bits=4, group_size=32, sym=True))
    assert scale.tolist() == [[fp16_up(4 / 15), fp16_up(1 / 15)]] and zero.tolist() == [[8.0, 8.0]]


def test_bf16_scales_are_bf16_values():
    torch.manual_seed(1)
    qw = rtn_quantize(torch.randn(8, 64), QuantScheme(group_size=32, scale_dtype="bf16"))
    assert torch.equal(qw.scales.bfloat16().float(), qw.scales)


# ------------------------------------------------------------------ fake quant

def test_fake_quant_matches_rtn_and_passes_gradients_straight_through():
    torch.manual_seed(2)
    scheme = QuantScheme(bits=4, group_size=32, sym=False)
    w = torch.randn(16, 64, requires_grad=True)
    y = fake_quant(w, scheme)
    assert torch.equal(y.detach(), rtn_dequantize(w.detach(), scheme))
    upstream = torch.randn(16, 64)
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_fake_quant_keeps_dtype():
    w = torch.randn(8, 32).bfloat16()
    y = fake_quant(w, QuantScheme(group_size=32))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, rtn_dequantize(w, QuantScheme(group_size=32)).bfloat16())


@pytest.mark.parametrize("sym", [True, False])
def test_mse_clip_never_rounds_worse_and_clips_outliers(sym):
    from slimlm.toolkit.quant.rtn import CLIP_NORM

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[::4, 7] = 0.6  # one outlier in every fourth row's first group
    plain, clipped = QuantScheme(group_size=32, sym=sym), QuantScheme(group_size=32, sym=sym, mse_clip=True)

    def group_error(scheme):
        q = rtn_quantize(w, scheme)
        return (q.dequantize() - w).abs().pow(CLIP_NORM).reshape(64, 8, 32).sum(-1), q.scales  # [64, 8] each

    err_plain, s_plain = group_error(plain)
    err_clip, s_clip = group_error(clipped)
    assert (err_clip <= err_plain * (1 + 1e-6)).all()  # the unclipped range is one of the candidates
    assert (err_clip < err_plain).float().mean() > 0.5  # and most groups find a better one
    assert (s_clip <= s_plain).all() and (s_clip < s_plain).any()  # only ever narrower
    assert clipped.to_dict()["mse_clip"] and not plain.to_dict()["mse_clip"]
