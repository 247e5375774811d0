"""HiddenAligner and the evenly spaced layer mapping."""
import pytest
import torch

from slimlm.toolkit.distill import HiddenAligner, evenly_spaced_pairs
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model


def test_thirty_layer_teacher_to_fifteen_layer_student():
    assert evenly_spaced_pairs(15, 30) == [(s, 2 * s) for s in range(1, 16)]
    assert evenly_spaced_pairs(15, 30, count=3) == [(5, 10), (10, 20), (15, 30)]


def test_uneven_depths_round_half_up_and_end_at_the_last_layer():
    # 4 -> 6: s * 6 / 4 = 1.5, 3, 4.5, 6 -> 2, 3, 5, 6
    assert evenly_spaced_pairs(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]
    with pytest.raises(SlimlmError, match="cannot align"):
        evenly_spaced_pairs(4, 6, count=5)


def test_equal_widths_have_no_parameters_and_zero_loss_for_equal_states():
    torch.manual_seed(0)
    states = [torch.randn(2, 5, 16) for _ in range(4)]
    for loss in ("mse", "cosine"):
        aligner = HiddenAligner(16, 16, student_layers=3, teacher_layers=3, loss=loss)
        assert list(aligner.parameters()) == []
        assert aligner(states, [s.clone() for s in states]).abs().item() < 1e-6


def test_hand_computed_values_and_mask():
    # Token 0: student [1, 2] vs teacher [0, 0]: MSE (1 + 4) / 2 = 2.5. Token 1 is masked garbage.
    student = [torch.tensor([[[1.0, 2.0], [100.0, 100.0]]])]
    teacher = [torch.tensor([[[0.0, 0.0], [-100.0, 0.0]]])]
    mask = torch.tensor([[1, 0]])
    assert HiddenAligner(2, 2, [(0, 0)])(student, teacher, mask).item() == pytest.approx(2.5)
    # Cosine: [1, 0] vs [0, 1] is orthogonal (loss 1), [1, 0] vs [2, 0] parallel (loss 0): mean 0.5.
    cos = HiddenAligner(2, 2, [(0, 0)], loss="cosine")
    student = [torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])]
    teacher = [torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])]
    assert cos(student, teacher).item() == pytest.approx(0.5)


def test_loss_averages_over_pairs():
    student = [torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]
    teacher = [torch.ones(1, 1, 2), torch.full((1, 1, 2), 3.0)]
    # pair (0, 0): MSE 1; pair (1, 1): MSE 9; mean 5.
    assert HiddenAligner(2, 2, [(0, 0), (1, 1)])(student, teacher).item() == pytest.approx(5.0)


def test_projection_learns_a_width_change():
    torch.manual_seed(1)
    target_map = torch.randn(8, 12)
    student = [torch.randn(4, 6, 8)]
    teacher = [student[0] @ target_map]
    aligner = HiddenAligner(8, 12, [(0, 0)])
    assert sum(p.numel() for p in aligner.parameters()) == 8 * 12
    opt = torch.optim.SGD(aligner.parameters(), lr=0.5)
    first = None
    for _ in range(20):
        loss = aligner(student, teacher)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert aligner(student, teacher).item() < 0.1 * first


def test_on_real_tiny_models_with_different_depth_and_width():
    teacher, _ = tiny_model("llama", num_hidden_layers=4)
    student, _ = tiny_model("llama", seed=1, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        t_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    s_hidden = student(input_ids=ids, output_hidden_states=True).hidden_states
    aligner = HiddenAligner(32, 64, student_layers=2, teacher_layers=4, loss="cosine")
    assert aligner.pairs == [(1, 2), (2, 4)]
    loss = aligner(s_hidden, t_hidden, mask=torch.ones(2, 7))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in aligner.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None


def test_out_of_range_layer_is_refused_with_a_hint():
    aligner = HiddenAligner(4, 4, [(3, 0)])
    with pytest.raises(SlimlmError, match="output_hidden_states=True"):
        aligner([torch.zeros(1, 2, 4)] * 2, [torch.zeros(1, 2, 4)])


def test_bad_configuration_is_refused():
    with pytest.raises(SlimlmError, match="unknown hidden-state loss"):
        HiddenAligner(4, 4, [(0, 0)], loss="l1")
    with pytest.raises(SlimlmError, match="needs layer pairs"):
        HiddenAligner(4, 4)
    with pytest.raises(SlimlmError, match="width"):
        HiddenAligner(4, 8, [(0, 0)])([torch.zeros(1, 2, 5)], [torch.zeros(1, 2, 8)])
