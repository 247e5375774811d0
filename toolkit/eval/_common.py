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


class LoggedProgress(Progress):
    """A progress bar that, where stderr is no terminal (a log file, a pipeline's tee), prints a plain line each
    time a task passes another tenth of its total or 30 s went by (a terminal's bar would draw nothing there)."""

    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **kwargs)
        self._logged: dict = {}  # task id -> (tenths, time) of its last line

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        if self.disable or self.console.is_terminal:
            return
        import time

        task = self._tasks[task_id]
        tenths = int(10 * task.completed / task.total) if task.total else 0
        last = self._logged.get(task_id, (-1, 0.0))
        if tenths > last[0] or time.monotonic() - last[1] > 30:
            self._logged[task_id] = (tenths, time.monotonic())
            total = f"/{task.total:g}" if task.total else ""
            self.console.print(f"{task.description}: {task.completed:g}{total}", highlight=False, markup=False)


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (stdout stays clean for tables); does nothing when not `enabled`; plain lines
    where stderr is no terminal (`LoggedProgress`)."""
    return LoggedProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                          disable=not enabled)
