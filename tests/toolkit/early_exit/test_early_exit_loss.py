"""The early-exit loss against a hand computation, and the curricula schedules."""
import pytest
import torch
import torch.nn.functional as F

from slimlm.toolkit.early_exit import active_exits, default_weights, early_exit_loss
from slimlm.toolkit.errors import SlimlmError


def ce(logits, labels):  # HF convention: logits[:, t] predicts labels[:, t + 1]
    logits = logits.detach()
    lg, tg = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
    keep = tg != -100
    return F.cross_entropy(lg[keep], tg[keep])


def kl(student, teacher, labels):  # forward KL(teacher || student), mean over labelled targets
    keep = labels[:, 1:].reshape(-1) != -100
    student = student.detach()
    s = F.log_softmax(student[:, :-1].reshape(-1, student.size(-1))[keep], -1)
    t = F.log_softmax(teacher[:, :-1].reshape(-1, teacher.size(-1))[keep], -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(2, 6, 11, generator=g)
    exits = {2: torch.randn(2, 6, 11, generator=g, requires_grad=True),
             5: torch.randn(2, 6, 11, generator=g, requires_grad=True)}
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = -100
    return final, exits, labels


def test_loss_equals_hand_computation(inputs):
    final, exits, labels = inputs
    w = {2: 0.25, 5: 0.75}
    loss, parts = early_exit_loss(final, exits, labels, w, final_weight=1.0, kd_weight=0.5)
    hand = (ce(final, labels) + 0.25 * (ce(exits[2], labels) + 0.5 * kl(exits[2], final, labels))
            + 0.75 * (ce(exits[5], labels) + 0.5 * kl(exits[5], final, labels))) / 2.0
    assert float(loss.detach()) == pytest.approx(float(hand.detach()), rel=1e-5)
    assert parts["ce_2"] == pytest.approx(float(ce(exits[2], labels)), rel=1e-5)
    assert parts["kd_5"] == pytest.approx(float(kl(exits[5], final, labels)), rel=1e-5)
    assert parts["loss"] == pytest.approx(float(hand), rel=1e-5)


def test_kd_target_is_detached_and_without_kd_there_is_no_kd_part(inputs):
    final, exits, labels = inputs
    final = final.clone().requires_grad_(True)
    loss, parts = early_exit_loss(final, exits, labels, {2: 1.0, 5: 1.0}, final_weight=0.0, kd_weight=1.0)
    loss.backward()
    assert final.grad is None or torch.count_nonzero(final.grad) == 0  # only the exits learn from it
    _, parts = early_exit_loss(final, {2: exits[2]}, labels, {2: 1.0})
    assert set(parts) == {"loss", "ce_final", "ce_2"}


def test_bad_weights_refused(inputs):
    final, exits, labels = inputs
    with pytest.raises(SlimlmError, match="weight"):
        early_exit_loss(final, exits, labels, {2: 1.0})  # no weight for exit 5
    with pytest.raises(SlimlmError, match="no positive weight"):
        early_exit_loss(final, {}, labels, {}, final_weight=0.0)


def test_default_weights_grow_with_depth():
    assert default_weights([6, 15, 30], 30) == {6: 0.2, 15: 0.5, 30: 1.0}


def test_all_and_rotational_curricula():
    layers = [4, 8, 12, 16]
    assert active_exits(layers, 7, 100, "all") == layers
    assert [active_exits(layers, s, 100, "rotational") for s in range(5)] == [[4], [8], [12], [16], [4]]
    assert [active_exits(layers, s, 100, "rotational", rotation=2) for s in range(3)] == [[4, 12], [8, 16], [4, 12]]
    counts = {e: sum(e in active_exits(layers, s, 100, "rotational") for s in range(100)) for e in layers}
    assert counts == {4: 25, 8: 25, 12: 25, 16: 25}  # every exit gets the same share of steps


def test_gradual_curriculum_enables_exits_from_last_to_first():
    layers = [4, 8, 12, 16]
    starts = {e: min(s for s in range(100) if e in active_exits(layers, s, 100, "gradual")) for e in layers}
    assert starts == {16: 0, 12: 25, 8: 50, 4: 75}
    assert active_exits(layers, 99, 100, "gradual") == layers
    for s in range(99):  # once on, an exit stays on
        assert set(active_exits(layers, s, 100, "gradual")) <= set(active_exits(layers, s + 1, 100, "gradual"))


def test_unknown_curriculum_refused():
    with pytest.raises(SlimlmError, match="unknown curriculum"):
        active_exits([1], 0, 10, "random")
