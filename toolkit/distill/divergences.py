"""Per-token divergences between two distributions given as log-probabilities over one support.

Notation used throughout `slimlm.toolkit.distill`: p is the teacher's distribution, q the student's.

    forward_kl       KL(p || q)                           mean-seeking: q must cover all of p
    reverse_kl       KL(q || p)                           mode-seeking: q may drop p's tail
    skew_kl          KL(p || a p + (1 - a) q)             a = `skew`; the *teacher* p is mixed into
                                                          the second argument (DistiLLM's "skew KL")
    skew_reverse_kl  KL(q || a q + (1 - a) p)             a = `skew`; the *student* q is mixed in
    js               b KL(p || m) + (1 - b) KL(q || m),   m = b p + (1 - b) q, b = `beta`
                                                          (generalized Jensen-Shannon; b = 0.5 is
                                                          the usual JS: symmetric, at most ln 2)

Skewing keeps the second argument of the KL away from zero wherever the first has mass, so the
loss and its gradient stay bounded (KL(p || a p + ...) <= ln(1/a)) where plain KL can blow up.

Everything works in log space: mixtures use `logaddexp`, never `log(exp(..) + exp(..))`, so no
probability underflows to 0 before its log is taken.
"""
from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "js")

# Log-probabilities are clamped to this floor before use. An impossible token (logit -inf) would
# otherwise give 0 * (-inf - -inf) = nan in the forward pass or in the backward of logsumexp
# (checked: an all -inf row makes logsumexp's gradient nan even when its upstream gradient is 0).
# exp(_FLOOR) is exactly 0 in fp32, and differences of two floors stay finite and 0, so an
# impossible token contributes exactly nothing; mass put where the other side is impossible costs
# about 1e30 per unit of probability: "infinite" for any purpose, yet with finite gradients.
_FLOOR = -1e30


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row: sum_v a_v (log a_v - log b_v). logp_*: [N, V] -> [N]."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * a + (1 - weight) * b), elementwise in log space. logp_*: [N, V] -> [N, V]."""
    log_wa = math.log(weight) if weight > 0 else -math.inf
    log_wb = math.log1p(-weight) if weight < 1 else -math.inf
    # One side may carry weight 0 (-inf); the other side is floored, so the result stays finite.
    return torch.logaddexp(logp_a + log_wa, logp_b + log_wb)


def divergence(kind: str, student_logp: torch.Tensor, teacher_logp: torch.Tensor,
               skew: float = 0.1, beta: float = 0.5) -> torch.Tensor:
    """The divergence `kind` (see the module docstring) per row, in the dtype given (use fp32).

    student_logp, teacher_logp: [N, V] normalized log-probabilities over the same support.
    Returns [N], in nats, without any temperature factor.
    """
    q = student_logp.clamp(min=_FLOOR)  # q, p: [N, V]
    p = teacher_logp.clamp(min=_FLOOR)
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "skew_kl":
        return _kl(p, _log_mix(p, q, skew))
    if kind == "skew_reverse_kl":
        return _kl(q, _log_mix(q, p, skew))
    if kind == "js":
        m = _log_mix(p, q, beta)
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(KINDS)}")
