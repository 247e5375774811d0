"""Small helpers shared by the evaluators: device lookup, a forward pass that returns logits, progress bars."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run `model` on `input_ids` [B, T] and return its logits [B, T, V] (any dtype)."""
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(**kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


@contextmanager
def eval_mode(model):
    """Switch dropout off for the duration (a model fresh from training may still be in train mode)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for tables); does nothing when not `enabled`."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=not enabled)
