"""distill_objective: KD + cross-entropy over the tokens that have a label."""
import math

import pytest
import torch

from slimlm.toolkit.distill import distill_objective
from slimlm.toolkit.errors import SlimlmError

LN3 = math.log(3)
FKL = 0.5 * math.log(4 / 3)  # KL([1/2, 1/2] || [1/4, 3/4])
CE = -math.log(0.75)  # -log q(token 1) with q = [1/4, 3/4]


def _batch():
    # B=1, T=3, V=2. Only position 0 has a target (labels are HF-style: labels[1] is the token that
    # logits[0] predicts). Positions 1 and 2 hold garbage that must not count.
    student = torch.tensor([[[0.0, LN3], [50.0, -50.0], [-9.0, 9.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [-50.0, 50.0], [9.0, -9.0]]])
    labels = torch.tensor([[0, 1, -100]])
    return student, teacher, labels


def test_kd_and_ce_mix_by_hand():
    student, teacher, labels = _batch()
    loss, parts = distill_objective(student, teacher, labels, kd_weight=0.7, ce_weight=0.3)
    assert loss.item() == pytest.approx(0.7 * FKL + 0.3 * CE, abs=1e-6)
    assert parts["kd"].item() == pytest.approx(FKL, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(CE, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(loss.item())
    assert parts["tokens"].item() == 1
    loss.backward()
    # Gradient only at the counted position: 0.7 (q - p) + 0.3 (q - onehot(1)).
    want = [0.7 * -0.25 + 0.3 * 0.25, 0.7 * 0.25 + 0.3 * -0.25]
    assert student.grad[0, 0].tolist() == pytest.approx(want, abs=1e-6)
    assert student.grad[0, 1:].abs().max() == 0


def test_already_aligned_labels():
    student, teacher, _ = _batch()
    loss, _ = distill_objective(student, teacher, torch.tensor([[1, -100, -100]]), ce_weight=1.0,
                                shift_labels=False)
    assert loss.item() == pytest.approx(FKL + CE, abs=1e-6)


def test_zero_weight_terms_are_not_computed():
    student, teacher, labels = _batch()
    _, kd_only = distill_objective(student, teacher, labels)
    assert set(kd_only) == {"loss", "kd", "tokens"}
    ce_loss, ce_only = distill_objective(student, teacher, labels, kd_weight=0.0, ce_weight=1.0)
    assert set(ce_only) == {"loss", "ce", "tokens"}
    assert ce_loss.item() == pytest.approx(CE, abs=1e-6)


def test_kd_options_pass_through():
    student, teacher, labels = _batch()
    loss, _ = distill_objective(student, teacher, labels, kind="reverse_kl", temperature=1.0)
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


def test_topk_teacher_pair_and_chunking_give_the_dense_result():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    dense, _ = distill_objective(s, t, labels, ce_weight=0.5, temperature=2.0)
    sparse, _ = distill_objective(s, t.topk(11, dim=-1), labels, ce_weight=0.5, temperature=2.0)
    chunked, _ = distill_objective(s, t, labels, ce_weight=0.5, temperature=2.0, chunk_size=5)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kd_weight=0.0), "at least one positive"),
    (dict(ce_weight=-1.0), "must be >= 0"),
    (dict(mask=torch.ones(1, 3)), "label"),
    (dict(reduction="sum"), "label"),
])
def test_bad_arguments_are_refused(kwargs, words):
    student, teacher, labels = _batch()
    with pytest.raises(SlimlmError, match=words):
        distill_objective(student, teacher, labels, **kwargs)


def test_label_shape_must_match():
    student, teacher, _ = _batch()
    with pytest.raises(SlimlmError, match="labels"):
        distill_objective(student, teacher, torch.zeros(1, 4, dtype=torch.long))
