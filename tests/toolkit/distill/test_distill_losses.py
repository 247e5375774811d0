"""kd_loss against hand-derived values, a plain-float reference, and the divergences' properties."""
import math

import pytest
import torch

from slimlm.toolkit.distill import KINDS, kd_loss
from slimlm.toolkit.errors import SlimlmError

LN3 = math.log(3)
# Teacher logits [0, 0] give p = [1/2, 1/2]; student logits [0, ln 3] give q = [1/4, 3/4].
TEACHER = torch.tensor([[0.0, 0.0]])
STUDENT = torch.tensor([[0.0, LN3]])
BY_HAND = {
    "forward_kl": 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),  # = ln(4/3) / 2
    "reverse_kl": 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
    # skew 0.1: m = 0.1 p + 0.9 q = [0.275, 0.725]
    "skew_kl": 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725),
    # skew 0.1: m = 0.1 q + 0.9 p = [0.475, 0.525]
    "skew_reverse_kl": 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525),
    # m = (p + q) / 2 = [0.375, 0.625]
    "js": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
          + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),
}


def ref_divergence(kind, s_row, t_row, temperature=1.0, skew=0.1, beta=0.5):
    """Plain-float reference: lists of logits in, one float out (times T**2)."""
    def softmax(row):
        top = max(row)
        e = [math.exp((x - top) / temperature) for x in row]
        return [x / sum(e) for x in e]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    q, p = softmax(s_row), softmax(t_row)
    mix = lambda a, b, w: [w * x + (1 - w) * y for x, y in zip(a, b)]  # noqa: E731
    value = {"forward_kl": lambda: kl(p, q), "reverse_kl": lambda: kl(q, p),
             "skew_kl": lambda: kl(p, mix(p, q, skew)),
             "skew_reverse_kl": lambda: kl(q, mix(q, p, skew)),
             "js": lambda: beta * kl(p, mix(p, q, beta)) + (1 - beta) * kl(q, mix(p, q, beta))}[kind]()
    return value * temperature ** 2


@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_hand_computed_value(kind):
    assert kd_loss(STUDENT, TEACHER, kind=kind).item() == pytest.approx(BY_HAND[kind], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_a_plain_float_reference_on_random_logits(kind):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7) * 3, torch.randn(2, 3, 7) * 3
    got = kd_loss(s, t, kind=kind, temperature=1.7, skew=0.2, beta=0.3, reduction="none")
    for b in range(2):
        for i in range(3):
            want = ref_divergence(kind, s[b, i].tolist(), t[b, i].tolist(), 1.7, 0.2, 0.3)
            assert got[b, i].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_temperature_divides_logits_and_multiplies_the_loss_by_t_squared():
    # At T = 2 the student logits [0, 2 ln 3] soften to [0, ln 3]: the same p, q as above.
    loss = kd_loss(torch.tensor([[0.0, 2 * LN3]]), TEACHER, temperature=2.0)
    assert loss.item() == pytest.approx(4 * BY_HAND["forward_kl"], abs=1e-6)


def test_forward_kl_gradient_is_t_times_q_minus_p():
    # d/ds [T^2 KL(p || softmax(s / T))] = T (q - p): the T^2 factor leaves the gradient O(1/T)
    # rather than O(1/T^2). Here q - p = [1/4 - 1/2, 3/4 - 1/2] = [-1/4, 1/4].
    s = torch.tensor([[0.0, 2 * LN3]], requires_grad=True)
    kd_loss(s, TEACHER, temperature=2.0).backward()
    assert s.grad.tolist()[0] == pytest.approx([-0.5, 0.5], abs=1e-6)


def test_mask_averages_over_counted_tokens_only():
    garbage = torch.tensor([[40.0, -40.0]])
    s = torch.cat([STUDENT, garbage, TEACHER]).unsqueeze(0)  # [1, 3, 2]
    t = torch.cat([TEACHER, -garbage, TEACHER]).unsqueeze(0)
    mask = torch.tensor([[1, 0, 1]])
    fkl = BY_HAND["forward_kl"]
    assert kd_loss(s, t, mask=mask).item() == pytest.approx(fkl / 2, abs=1e-6)
    assert kd_loss(s, t, mask=mask, reduction="sum").item() == pytest.approx(fkl, abs=1e-6)
    assert kd_loss(s, t, mask=mask, reduction="none")[0].tolist() == pytest.approx([fkl, 0, 0], abs=1e-6)
    assert kd_loss(s, t, mask=torch.zeros(1, 3)).item() == 0.0  # nothing counted: 0, not nan


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_of_a_distribution_from_itself_is_zero(kind):
    logits = torch.randn(4, 5, 11) * 4
    assert kd_loss(logits, logits.clone(), kind=kind, temperature=1.5).abs().item() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_divergences_are_non_negative(kind):
    torch.manual_seed(1)
    per_token = kd_loss(torch.randn(8, 13) * 3, torch.randn(8, 13) * 3, kind=kind, reduction="none")
    assert (per_token >= -1e-7).all()


def test_js_is_symmetric_and_bounded_by_ln2():
    torch.manual_seed(2)
    a, b = torch.randn(6, 17) * 5, torch.randn(6, 17) * 5
    ab, ba = kd_loss(a, b, kind="js", reduction="none"), kd_loss(b, a, kind="js", reduction="none")
    assert torch.allclose(ab, ba, atol=1e-7)
    assert (ab <= math.log(2) + 1e-6).all()
    # Disjoint supports reach the bound.
    far = kd_loss(torch.tensor([[60.0, 0.0]]), torch.tensor([[0.0, 60.0]]), kind="js")
    assert far.item() == pytest.approx(math.log(2), abs=1e-6)


def test_skew_interpolates_between_plain_kl_and_zero_and_stays_bounded():
    torch.manual_seed(3)
    s, t = torch.randn(5, 9) * 2, torch.randn(5, 9) * 2
    assert kd_loss(s, t, kind="skew_kl", skew=0.0).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-6)
    assert kd_loss(s, t, kind="skew_reverse_kl", skew=0.0).item() == pytest.approx(
        kd_loss(s, t, kind="reverse_kl").item(), rel=1e-6)
    assert kd_loss(s, t, kind="skew_kl", skew=1.0).abs().item() < 1e-7
    # Nearly disjoint: plain KL ~ 60 nats, skew KL at most ln(1 / 0.1).
    far_s, far_t = torch.tensor([[-30.0, 30.0]]), torch.tensor([[30.0, -30.0]])
    assert kd_loss(far_s, far_t).item() > 50
    assert kd_loss(far_s, far_t, kind="skew_kl", skew=0.1).item() <= math.log(10) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_finite_with_impossible_tokens_and_extreme_logits(kind):
    torch.manual_seed(4)
    t = torch.randn(3, 4, 10) * 3
    t[..., -2:] = float("-inf")  # e.g. a teacher that masks padded vocabulary rows
    s = (torch.randn(3, 4, 10) * 80).requires_grad_(True)
    loss = kd_loss(s, t, kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(kind):
    torch.manual_seed(5)
    s = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [0, 1]])
    assert torch.autograd.gradcheck(  # through the chunked, checkpointed path
        lambda x: kd_loss(x, t, kind=kind, temperature=1.3, mask=mask, chunk_size=3), (s,), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_are_upcast_to_fp32(kind):
    torch.manual_seed(6)
    s, t = (torch.randn(2, 4, 50) * 4).bfloat16(), (torch.randn(2, 4, 50) * 4).bfloat16()
    low = kd_loss(s, t, kind=kind)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(kd_loss(s.float(), t.float(), kind=kind).item(), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_equals_unchunked_in_value_and_gradient(kind, reduction):
    torch.manual_seed(7)
    s0, t = torch.randn(3, 7, 31) * 3, torch.randn(3, 7, 31) * 3
    mask = torch.ones(3, 7)
    mask[1] = 0  # with chunk_size 7, the second chunk is all padding and is skipped
    mask[2, :3] = 0
    results = []
    for chunk in (None, 7, 4):
        s = s0.clone().requires_grad_(True)
        out = kd_loss(s, t, kind=kind, mask=mask, reduction=reduction, chunk_size=chunk)
        (out.sum() if reduction == "none" else out).backward()
        results.append((out.detach(), s.grad))
    for out, grad in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-7)
    assert results[0][1][1].abs().max() == 0  # padding gets no gradient
    with torch.no_grad():  # the path without checkpointing
        plain = kd_loss(s0, t, kind=kind, mask=mask, reduction=reduction, chunk_size=4)
    assert torch.allclose(plain, results[0][0], atol=1e-6)


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    kd_loss(s, t, kind="js").backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("kwargs, words", [
    (dict(kind="kl"), "unknown distillation loss"),
    (dict(temperature=0.0), "temperature"),
    (dict(skew=1.5), "skew"),
    (dict(reduction="avg"), "reduction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(mask=torch.ones(2, 4)), "mask"),
])
def test_bad_options_are_refused(kwargs, words):
    with pytest.raises(SlimlmError, match=words):
        kd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), **kwargs)


def test_vocab_mismatch_is_refused_with_a_hint():
    with pytest.raises(SlimlmError, match="differ in shape") as err:
        kd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 6))
    assert "check_same_tokenizer" in str(err.value)
