"""kd_loss_topk: a teacher known only by its top-k logits."""
import math

import pytest
import torch

from slimlm.toolkit.distill import KINDS, kd_loss, kd_loss_topk
from slimlm.toolkit.errors import SlimlmError


def test_hand_computed_forward_kl_against_a_truncated_teacher():
    # V = 3, teacher keeps tokens 0 and 1 with equal logits: p_k = [1/2, 1/2, 0];
    # student logits all 0: q = [1/3, 1/3, 1/3]. KL = 2 * 1/2 * ln((1/2) / (1/3)) = ln 1.5.
    loss = kd_loss_topk(torch.zeros(1, 3), torch.tensor([[2.0, 2.0]]), torch.tensor([[0, 1]]))
    assert loss.item() == pytest.approx(math.log(1.5), abs=1e-6)


def test_hand_computed_reverse_kl_renormalises_the_student_over_the_top_k():
    # Student logits [0, ln 3, 5]: over tokens {0, 1} it renormalises to [1/4, 3/4]; the teacher
    # is [1/2, 1/2] there, so KL(q_k || p_k) = 1/4 ln(1/2) + 3/4 ln(3/2).
    s = torch.tensor([[0.0, math.log(3), 5.0]])
    loss = kd_loss_topk(s, torch.tensor([[0.0, 0.0]]), torch.tensor([[1, 0]]), kind="reverse_kl")
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_logprobs", [False, True])
def test_k_equal_to_vocab_equals_the_dense_loss(kind, as_logprobs):
    torch.manual_seed(0)
    s0, t = torch.randn(2, 5, 13) * 3, torch.randn(2, 5, 13) * 3
    values, indices = (t.log_softmax(-1) if as_logprobs else t).topk(13, dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    s_dense, s_top = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    dense = kd_loss(s_dense, t, kind=kind, temperature=2.0, mask=mask)
    sparse = kd_loss_topk(s_top, values, indices.int(), kind=kind, temperature=2.0, mask=mask)
    dense.backward()
    sparse.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(s_top.grad, s_dense.grad, atol=1e-6)
    assert torch.isfinite(s_top.grad).all()


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl", "skew_reverse_kl", "js"])
def test_k_below_vocab_is_exact_against_the_truncated_teacher(kind):
    # The docstring's claim: apart from truncating the teacher, the tail bucket loses nothing.
    torch.manual_seed(1)
    s, t = torch.randn(6, 20) * 2, torch.randn(6, 20) * 2
    values, indices = t.topk(4, dim=-1)
    truncated = torch.full_like(t, float("-inf")).scatter(-1, indices, values)
    dense = kd_loss(s, truncated, kind=kind, temperature=1.5)
    assert kd_loss_topk(s, values, indices, kind=kind, temperature=1.5).item() == pytest.approx(
        dense.item(), rel=1e-5)


def test_k_below_vocab_reverse_kl_compares_the_two_renormalised_top_k():
    torch.manual_seed(2)
    s, t = torch.randn(6, 20) * 2, torch.randn(6, 20) * 2
    values, indices = t.topk(4, dim=-1)
    restricted = kd_loss(s.gather(-1, indices), values, kind="reverse_kl")
    assert kd_loss_topk(s, values, indices, kind="reverse_kl").item() == pytest.approx(
        restricted.item(), rel=1e-5)


def test_chunked_equals_unchunked():
    torch.manual_seed(3)
    s, t = torch.randn(2, 9, 30), torch.randn(2, 9, 30)
    values, indices = t.topk(6, dim=-1)
    for kind in KINDS:
        whole = kd_loss_topk(s, values, indices, kind=kind)
        assert kd_loss_topk(s, values, indices, kind=kind, chunk_size=4).item() == pytest.approx(
            whole.item(), rel=1e-6)


def test_fp16_cache_values_work():
    torch.manual_seed(4)
    s, t = torch.randn(4, 40), torch.randn(4, 40)
    values, indices = t.log_softmax(-1).topk(8, dim=-1)
    half = kd_loss_topk(s, values.half(), indices.int())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(kd_loss_topk(s, values, indices).item(), rel=1e-3)


def test_mismatched_shapes_are_refused():
    with pytest.raises(SlimlmError, match="do not match"):
        kd_loss_topk(torch.randn(2, 3, 10), torch.randn(2, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(SlimlmError, match="more than"):
        kd_loss_topk(torch.randn(2, 5), torch.randn(2, 6), torch.zeros(2, 6, dtype=torch.long))
