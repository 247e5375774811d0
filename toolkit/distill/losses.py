"""Logit distillation losses: a dense teacher (`kd_loss`), a top-k teacher cache (`kd_loss_topk`),
and the KD + cross-entropy mix a training step optimizes (`distill_objective`).

Conventions shared by all three:
- Temperature T divides both models' logits before the softmax, and the loss is multiplied by T**2
  (Hinton et al.'s convention): the gradient of a softened KL shrinks like 1/T**2, so the factor
  keeps its scale, and its balance against cross-entropy, roughly independent of T. At T = 1 the
  loss is the plain divergence in nats.
- Logits are [B, T, V] with a token mask [B, T], or [N, V] with a mask [N]; the mask marks tokens
  that count (padding and prompt excluded). "mean" averages over counted tokens only.
- Work happens in fp32 at least (bf16/fp16 logits are upcast chunk by chunk; fp64 stays fp64).
- The teacher is a fixed target: its logits are detached, so no gradient reaches it.

Memory: a [8, 512, 49152] bf16 logit tensor is 0.4 GB, and the fp32 intermediates of one
divergence are several times that again. With `chunk_size` the tokens are processed in chunks of
that many rows, each under activation checkpointing, so only one chunk's intermediates exist at a
time (recomputed in backward); peak extra memory is then about 8 * chunk_size * V * 4 bytes (e.g.
~1.6 GB at chunk_size 1024, V 49152), plus the gradient of the student logits itself.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import SlimlmError
from .divergences import _FLOOR, KINDS, divergence

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here"
REDUCTIONS = ("mean", "sum", "none")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
            temperature: float = 1.0, skew: float = 0.1, mask: torch.Tensor | None = None,
            reduction: str = "mean", chunk_size: int | None = None, beta: float = 0.5) -> torch.Tensor:
    """Distillation loss between student and teacher logits, times temperature**2.

    Args:
        student_logits, teacher_logits: [B, T, V] or [N, V], same shape (any float dtype).
        kind: "forward_kl" KL(p||q), "reverse_kl" KL(q||p), "skew_kl" KL(p || skew p + (1-skew) q),
            "skew_reverse_kl" KL(q || skew q + (1-skew) p), "js" (generalized Jensen-Shannon with
            weight `beta` on the teacher); p = teacher, q = student (see `divergences`).
        temperature: softens both distributions; the result is multiplied by temperature**2.
        skew: the mixing weight a of the skew kinds, in [0, 1] (0 gives plain KL, 1 gives 0).
        mask: [B, T] (or [N]), nonzero where a token counts; None counts every token.
        reduction: "mean" over counted tokens (0 when none count), "sum", or "none" for the
            per-token losses [B, T] (or [N]) with 0 at uncounted tokens.
        chunk_size: tokens per chunk (None: all at once); bounds peak memory, same result.
        beta: the teacher's weight in "js"; 0.5 is the symmetric Jensen-Shannon divergence.
    """
    _check_options(kind, temperature, skew, beta, reduction, chunk_size)
    if student_logits.shape != teacher_logits.shape:
        raise SlimlmError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape.",
            "Both must be [batch, tokens, vocab] for the same batch; a differing vocab size means "
            "different tokenizers (see check_same_tokenizer) or padded embeddings (slice the logits "
            "to the tokenizer's vocabulary, logits[..., :len(tokenizer)]).")
    vocab = student_logits.shape[-1]
    fn = functools.partial(_dense_chunk, kind=kind, temperature=temperature, skew=skew, beta=beta)
    return _reduce_tokens(fn, [student_logits.reshape(-1, vocab),
                               teacher_logits.detach().reshape(-1, vocab)],
                          student_logits.shape[:-1], mask, reduction, chunk_size) * temperature ** 2


def kd_loss_topk(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                 kind: str = "forward_kl", temperature: float = 1.0, skew: float = 0.1,
                 mask: torch.Tensor | None = None, reduction: str = "mean",
                 chunk_size: int | None = None, beta: float = 0.5) -> torch.Tensor:
    """`kd_loss` against a sparse teacher that kept only its top-k logits per token (a TopkCache).

    Args:
        student_logits: [B, T, V] or [N, V].
        topk_values: [B, T, k] (or [N, k]) the teacher's top-k logits, or its log-probabilities
            (the same thing here: renormalising over the k entries cancels any per-token shift).
        topk_indices: [B, T, k] (or [N, k]) their token ids (int32 or int64).
        The other arguments are those of `kd_loss`.

    The approximation: the teacher p is replaced by p_k, its softmax(values / T) renormalised over
    its k tokens, i.e. the teacher's tail mass is handed to its top k in proportion. The student q
    keeps its full-vocabulary softmax; its log-probs are gathered at the k indices and all of its
    remaining mass is one extra "tail" outcome, where p_k is 0. For forward_kl, skew_kl,
    skew_reverse_kl and js that bucketing loses nothing, so the loss is the dense loss against
    p_k exactly (the tail terms of the skew/JS mixtures collapse into one). reverse_kl against
    p_k would be infinite whenever the student has any mass outside the k tokens, so for it the
    student is renormalised over the k tokens as well: KL(q_k || p_k). With k = V the result
    equals `kd_loss` on the dense logits.
    """
    _check_options(kind, temperature, skew, beta, reduction, chunk_size)
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise SlimlmError(
            f"top-k values {tuple(topk_values.shape)} and indices {tuple(topk_indices.shape)} do not "
            f"match student logits {tuple(student_logits.shape)}.",
            "Values and indices must be [batch, tokens, k] for the same batch as the logits "
            "(as TopkCache.get returns them).")
    vocab, k = student_logits.shape[-1], topk_values.shape[-1]
    if k > vocab:
        raise SlimlmError(f"the teacher cache holds k={k} tokens per position, more than the "
                          f"student's vocabulary of {vocab}.", "Use a cache written for this vocabulary.")
    fn = functools.partial(_topk_chunk, kind=kind, temperature=temperature, skew=skew, beta=beta)
    return _reduce_tokens(fn, [student_logits.reshape(-1, vocab),
                               topk_values.detach().reshape(-1, k), topk_indices.reshape(-1, k)],
                          student_logits.shape[:-1], mask, reduction, chunk_size) * temperature ** 2


def distill_objective(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor,
                      kd_weight: float = 1.0, ce_weight: float = 0.0, *, shift_labels: bool = True,
                      **kd_kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kd_weight * KD + ce_weight * cross-entropy, over the tokens that have a label.

    Args:
        student_logits: [B, T, V].
        teacher_logits: [B, T, V] dense logits, or a `(topk_values, topk_indices)` pair from a
            TopkCache (then `kd_loss_topk` is used).
        labels: [B, T] in Hugging Face's convention, as passed to `model(labels=...)`: labels[b, t]
            is the token *at* position t (input_ids, with -100 where no loss is wanted), and
            logits[b, t] predicts labels[b, t + 1]; the shift happens here (on the labels, so the
            logits are never copied). With `shift_labels=False`, labels[b, t] is already the
            target of logits[b, t] (and [N, V] logits with [N] labels are accepted).
        kd_weight, ce_weight: the weights of the two terms; a term with weight 0 is not computed.
        kd_kwargs: `kind`, `temperature`, `skew`, `beta`, `chunk_size` as in `kd_loss`
            (`chunk_size` also chunks the cross-entropy). The KD mask is the label mask: KD and CE
            count exactly the same tokens, so a prompt labelled -100 gets neither.

    Returns:
        (loss, parts): parts holds detached tensors "loss", "kd" and/or "ce" (each the unweighted
        mean over counted tokens, KD already times T**2), and "tokens" (how many counted).
    """
    if kd_weight < 0 or ce_weight < 0 or kd_weight == ce_weight == 0:
        raise SlimlmError(f"kd_weight={kd_weight} and ce_weight={ce_weight}: both must be >= 0 and "
                          "at least one positive.", "Use kd_weight 1.0 (pure distillation) or add ce_weight.")
    for key in ("mask", "reduction"):
        if key in kd_kwargs:
            raise SlimlmError(f"distill_objective takes no {key!r}: it averages over the tokens "
                              "whose label is not -100.", "Set labels to -100 where no loss is wanted.")
    targets = _aligned_targets(labels, student_logits.shape[:-1], shift_labels)  # targets: [B, T]
    counted = targets != IGNORE_INDEX
    loss = student_logits.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {"tokens": counted.sum()}
    if kd_weight > 0:
        if isinstance(teacher_logits, (tuple, list)):
            values, indices = teacher_logits
            kd = kd_loss_topk(student_logits, values, indices, mask=counted, **kd_kwargs)
        else:
            kd = kd_loss(student_logits, teacher_logits, mask=counted, **kd_kwargs)
        loss = loss + kd_weight * kd
        parts["kd"] = kd.detach()
    if ce_weight > 0:
        vocab = student_logits.shape[-1]
        ce = _reduce_tokens(_ce_chunk, [student_logits.reshape(-1, vocab), targets.reshape(-1)],
                            targets.shape, counted, "mean", kd_kwargs.get("chunk_size"))
        loss = loss + ce_weight * ce
        parts["ce"] = ce.detach()
    parts["loss"] = loss.detach()
    return loss, parts


# --- per-chunk computations: [n, V] rows in, [n] per-token losses out (fp32) ---

def _dense_chunk(student: torch.Tensor, teacher: torch.Tensor, *, kind, temperature, skew, beta):
    q = F.log_softmax(_upcast(student) / temperature, dim=-1)  # q, p: [n, V]
    p = F.log_softmax(_upcast(teacher) / temperature, dim=-1)
    return divergence(kind, q, p, skew, beta)


def _topk_chunk(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, *, kind,
                temperature, skew, beta):
    q_full = F.log_softmax(_upcast(student) / temperature, dim=-1).clamp(min=_FLOOR)  # [n, V]
    p_k = F.log_softmax(_upcast(values) / temperature, dim=-1)  # teacher renormalised: [n, k]
    indices = indices.long()
    q_k = q_full.gather(-1, indices)  # [n, k]
    if kind == "reverse_kl":
        return divergence(kind, F.log_softmax(q_k, dim=-1), p_k, skew, beta)
    # Student mass outside the k tokens, as one outcome. Knocked-out entries are floored, not -inf,
    # so with k = V the row is all floor and logsumexp's backward stays finite.
    q_tail = q_full.scatter(-1, indices, _FLOOR).logsumexp(-1, keepdim=True)  # [n, 1]
    p_tail = torch.full_like(q_tail, _FLOOR)
    return divergence(kind, torch.cat([q_k, q_tail], -1), torch.cat([p_k, p_tail], -1), skew, beta)


def _ce_chunk(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(student), targets, ignore_index=IGNORE_INDEX, reduction="none")


# --- shared plumbing ---

def _upcast(x: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 log-softmax over 49k tokens loses the small probabilities; fp64 stays fp64 (gradcheck).
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce_tokens(fn: Callable[..., torch.Tensor], rows: list[torch.Tensor], token_shape: torch.Size,
                   mask: torch.Tensor | None, reduction: str, chunk_size: int | None) -> torch.Tensor:
    """Apply `fn` to `rows` (each [N, ...]) chunk by chunk, then mask and reduce the [N] result."""
    n = rows[0].shape[0]
    if mask is None:
        counted = torch.ones(n, dtype=torch.bool, device=rows[0].device)
    else:
        if mask.shape != token_shape:
            raise SlimlmError(f"mask {tuple(mask.shape)} does not match the logits' tokens "
                              f"{tuple(token_shape)}.", "Pass one mask entry per token ([batch, tokens]).")
        counted = mask.reshape(n).to(rows[0].device) != 0  # counted: [N]
    per_token = _chunked(fn, rows, counted, chunk_size)  # per_token: [N] fp32
    # where, not multiply: an uncounted row (padding) may hold garbage, and 0 * inf would be nan.
    per_token = torch.where(counted, per_token, per_token.new_zeros(()))
    if reduction == "none":
        return per_token.view(token_shape)
    total = per_token.sum()
    return total if reduction == "sum" else total / counted.sum().clamp(min=1)


def _chunked(fn, rows: list[torch.Tensor], counted: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    if chunk_size is not None and chunk_size < 1:  # the cross-entropy path reaches here unchecked
        raise SlimlmError(f"chunk_size must be a positive number of tokens, got {chunk_size}.",
                          "Use None for no chunking, or e.g. 1024.")
    n = rows[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(*rows)
    # Checkpoint only when a gradient will be asked for; otherwise plain chunks free as they go.
    needs_grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    # One host sync for all chunks (not one per chunk): which chunks hold any counted token.
    padded = F.pad(counted, (0, -n % chunk_size))
    has_tokens = padded.view(-1, chunk_size).any(dim=1).tolist()
    out = []
    # split returns views; its backward stitches the chunk gradients into one [N, V] gradient.
    for chunk, wanted in zip(zip(*(r.split(chunk_size) for r in rows)), has_tokens):
        if not wanted:  # all padding: skip the work; such rows get zero loss and zero gradient
            dtype = torch.promote_types(chunk[0].dtype, torch.float32)
            out.append(torch.zeros(chunk[0].shape[0], device=chunk[0].device, dtype=dtype))
        elif needs_grad:
            out.append(checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(fn(*chunk))
    return torch.cat(out)


def _aligned_targets(labels: torch.Tensor, token_shape: torch.Size, shift: bool) -> torch.Tensor:
    if labels.shape != token_shape:
        raise SlimlmError(f"labels {tuple(labels.shape)} do not match the logits' tokens {tuple(token_shape)}.",
                          "Pass labels shaped like input_ids ([batch, tokens]).")
    if not shift:
        return labels
    if labels.dim() != 2:
        raise SlimlmError(f"cannot shift labels of shape {tuple(labels.shape)}: shifting needs [batch, tokens].",
                          "Pass [batch, tokens] labels, or already aligned ones with shift_labels=False.")
    # targets[b, t] = labels[b, t + 1]; the last position has nothing to predict.
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _check_options(kind, temperature, skew, beta, reduction, chunk_size) -> None:
    if kind not in KINDS:
        raise SlimlmError(f"unknown distillation loss {kind!r}.", f"Use one of: {', '.join(KINDS)}.")
    if not temperature > 0:
        raise SlimlmError(f"temperature must be positive, got {temperature}.", "1.0 is the usual choice.")
    if not 0 <= skew <= 1 or not 0 <= beta <= 1:
        raise SlimlmError(f"skew and beta are mixing weights in [0, 1], got skew={skew}, beta={beta}.",
                          "DistiLLM uses skew 0.1; beta 0.5 is the symmetric Jensen-Shannon divergence.")
    if reduction not in REDUCTIONS:
        raise SlimlmError(f"unknown reduction {reduction!r}.", f"Use one of: {', '.join(REDUCTIONS)}.")
    if chunk_size is not None and chunk_size < 1:
        raise SlimlmError(f"chunk_size must be a positive number of tokens, got {chunk_size}.",
                          "Use None for no chunking, or e.g. 1024.")
