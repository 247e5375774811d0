"""Hidden-state alignment: pull chosen student layers toward chosen teacher layers.

Layers are numbered as indices into Hugging Face's `output_hidden_states=True` tuple, which holds
num_layers + 1 tensors: index 0 is the embedding output, index i (1 <= i <= L) the output of
block i (for most HF models the last one after the final norm). So "layer 15 of a 15-layer
student" is index 15, and the evenly spaced rule maps it to index 30 of a 30-layer teacher.

Widths may differ (a pruned student): each pair then gets its own learned linear map from the
student's width to the teacher's (the teacher's space is the fixed target, so the map lives on the
student side and trains with the student). Equal widths get no map and no parameters, so the
loss is on the raw states and is exactly 0 when they agree.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimlmError

ALIGN_LOSSES = ("mse", "cosine")


def evenly_spaced_pairs(student_layers: int, teacher_layers: int,
                        count: int | None = None) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) spreading the student's blocks over the teacher's depth.

    Student block s (1..student_layers) maps to teacher block round(s * teacher_layers /
    student_layers), halves rounded up, so the last block always maps to the last block and the
    mapping is monotone; 15 -> 30 gives (1, 2), (2, 4), ..., (15, 30). `count` aligns only that
    many student blocks, themselves evenly spaced and ending at the last (e.g. count=3 of 15:
    blocks 5, 10, 15). The embedding output (index 0) is never paired: students usually start
    from the teacher's embeddings.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise SlimlmError(f"layer counts must be positive, got student {student_layers}, "
                          f"teacher {teacher_layers}.")
    count = student_layers if count is None else count
    if not 1 <= count <= student_layers:
        raise SlimlmError(f"cannot align {count} layers of a {student_layers}-layer student.",
                          f"Choose a count between 1 and {student_layers}.")
    chosen = [_round_div(j * student_layers, count) for j in range(1, count + 1)]
    return [(s, _round_div(s * teacher_layers, student_layers)) for s in chosen]


def _round_div(num: int, den: int) -> int:
    # Integer round-half-up, so the rule does not depend on float rounding or banker's rounding.
    return (2 * num + den) // (2 * den)


class HiddenAligner(nn.Module):
    """Loss between paired student and teacher hidden states, with projections where widths differ.

    Args:
        student_width, teacher_width: hidden sizes of the two models.
        pairs: (student index, teacher index) pairs into the `hidden_states` tuples; or None with
            `student_layers` and `teacher_layers` to use `evenly_spaced_pairs` (and `count`).
        loss: "mse" (mean squared error per element) or "cosine" (1 - cosine similarity per token).
            Teachers often have a few huge "massive activation" dimensions that dominate MSE;
            cosine ignores scale and is the safer choice there.

    forward(student_hidden, teacher_hidden, mask=None) takes the two tuples and a [B, T] mask of
    counted tokens and returns the loss averaged over counted tokens and over pairs (so adding
    pairs does not change its scale), in fp32. Teacher states are detached.
    """

    def __init__(self, student_width: int, teacher_width: int,
                 pairs: Sequence[tuple[int, int]] | None = None, *, student_layers: int | None = None,
                 teacher_layers: int | None = None, count: int | None = None, loss: str = "mse"):
        super().__init__()
        if loss not in ALIGN_LOSSES:
            raise SlimlmError(f"unknown hidden-state loss {loss!r}.", f"Use one of: {', '.join(ALIGN_LOSSES)}.")
        if pairs is None:
            if student_layers is None or teacher_layers is None:
                raise SlimlmError("HiddenAligner needs layer pairs, or student_layers and teacher_layers "
                                  "for an evenly spaced mapping.")
            pairs = evenly_spaced_pairs(student_layers, teacher_layers, count)
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        if not self.pairs or any(s < 0 or t < 0 for s, t in self.pairs):
            raise SlimlmError(f"invalid layer pairs {self.pairs}.",
                              "Give at least one (student index, teacher index) pair, indices >= 0.")
        self.student_width, self.teacher_width, self.loss = student_width, teacher_width, loss
        self.projections = None
        if student_width != teacher_width:
            self.projections = nn.ModuleList(
                nn.Linear(student_width, teacher_width, bias=False) for _ in self.pairs)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for i, (s_idx, t_idx) in enumerate(self.pairs):
            h_s = _pick(student_hidden, s_idx, "student", self.student_width)  # h_s: [B, T, Ds]
            h_t = _pick(teacher_hidden, t_idx, "teacher", self.teacher_width).detach()  # [B, T, Dt]
            if self.projections is not None:
                proj = self.projections[i]
                h_s = proj(h_s.to(proj.weight.dtype))  # h_s: [B, T, Dt]
            per_token = _per_token(h_s.float(), h_t.float(), self.loss)  # per_token: [B, T]
            term = _masked_mean(per_token, mask)
            total = term if total is None else total + term
        return total / len(self.pairs)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, loss={self.loss!r}, widths={self.student_width}->{self.teacher_width}"


def _pick(hidden: Sequence[torch.Tensor], index: int, who: str, width: int) -> torch.Tensor:
    if index >= len(hidden):
        raise SlimlmError(
            f"the {who} has {len(hidden)} hidden states, so layer index {index} does not exist.",
            "Run the model with output_hidden_states=True and use indices 0..num_layers "
            "(0 is the embedding output).")
    h = hidden[index]
    if h.shape[-1] != width:
        raise SlimlmError(f"{who} hidden states have width {h.shape[-1]}, but the aligner was built "
                          f"for {width}.", "Build HiddenAligner with the models' hidden_size values.")
    return h


def _per_token(h_s: torch.Tensor, h_t: torch.Tensor, loss: str) -> torch.Tensor:
    if h_s.shape != h_t.shape:
        raise SlimlmError(f"student states {tuple(h_s.shape)} and teacher states {tuple(h_t.shape)} "
                          "differ in batch or length.", "Run both models on the same batch.")
    if loss == "mse":
        return (h_s - h_t).pow(2).mean(-1)
    return 1 - F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise SlimlmError(f"mask {tuple(mask.shape)} does not match the hidden states' tokens "
                          f"{tuple(per_token.shape)}.", "Pass one mask entry per token ([batch, tokens]).")
    counted = mask.to(per_token.device) != 0
    return torch.where(counted, per_token, 0.0).sum() / counted.sum().clamp(min=1)
