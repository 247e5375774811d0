"""Distillation: logit losses (dense or top-k teacher), hidden-state alignment, a teacher top-k cache."""
from .divergences import KINDS
from .hidden import HiddenAligner, evenly_spaced_pairs
from .losses import distill_objective, kd_loss, kd_loss_topk
from .teacher_cache import TopkCache, token_digest, write_topk_cache
from .tokenizer_check import check_same_tokenizer

__all__ = ["KINDS", "HiddenAligner", "TopkCache", "check_same_tokenizer", "distill_objective",
           "evenly_spaced_pairs", "kd_loss", "kd_loss_topk", "token_digest", "write_topk_cache"]
