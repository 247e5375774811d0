"""Per-exit quality on held-out text, in one forward pass per batch of windows.

For each exit E: perplexity of its logits, and agreement, the fraction of predicted positions where
argmax(exit logits) == argmax(final logits). Agreement is what self-speculative decoding can expect:
a draft token from exit E is accepted under greedy verification exactly when it equals the full
model's argmax (given the same prefix), so with per-token agreement a the expected accepted run of
k drafts is (a + a^2 + ... + a^k) tokens (if agreements were independent).

Windows are those of `toolkit.eval.perplexity` (non-overlapping, incomplete tail dropped), so the
`final` perplexity here equals `slimlm eval`'s on the same settings.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..errors import SlimlmError
from ..eval._common import eval_mode, model_device, progress_bar
from .heads import ExitHeads, exit_logits


def exit_figures(model, exits: ExitHeads, tokens: torch.Tensor, window: int = 512, batch_size: int = 1,
                 max_windows: int | None = None, progress: bool = True, spread: bool = False) -> dict:
    """Figures of the final layer and every exit on the token stream `tokens` [T] (see `evaluate_exits`)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if window < 2 or batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise SlimlmError("window must be >= 2, batch_size and max_windows >= 1.")
    n = tokens.numel() // window
    if n == 0:
        raise SlimlmError(f"the text has {tokens.numel()} tokens, fewer than one window of {window}.",
                          "Use a smaller window or more text.")
    total, n = n, min(n, max_windows or n)
    windows = tokens[:total * window].view(total, window)  # [total, W]
    windows = windows[(torch.arange(n) * total) // n if spread else slice(0, n)]  # [N, W]: as `perplexity` picks them
    device = model_device(model)
    nll = {name: 0.0 for name in ["final", *exits.layers]}
    agree = {e: 0 for e in exits.layers}
    counted = 0
    with eval_mode(model), eval_mode(exits), torch.inference_mode(), progress_bar(progress) as bar:
        task = bar.add_task("early-exit eval", total=n)
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size].to(device)  # [B, W]
            targets = batch[:, 1:].reshape(-1)  # [B*(W-1)]
            final, by_exit = exit_logits(model, batch, exits)
            final = final[:, :-1].float().reshape(-1, final.size(-1))  # [B*(W-1), V]
            nll["final"] += F.cross_entropy(final, targets, reduction="sum").item()
            best = final.argmax(-1)  # [B*(W-1)]
            for e, logits in by_exit.items():
                logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
                nll[e] += F.cross_entropy(logits, targets, reduction="sum").item()
                agree[e] += int((logits.argmax(-1) == best).sum())
            counted += targets.numel()
            bar.update(task, advance=len(batch))

    def ppl(total: float) -> dict:
        return {"perplexity": math.exp(total / counted), "nll_per_token": total / counted}

    return {"final": ppl(nll["final"]),
            "exits": {str(e): {**ppl(nll[e]), "agreement": agree[e] / counted} for e in exits.layers},
            "norm": exits.norm_kind, "num_layers": exits.num_layers, "windows": n, "window": window,
            "tokens": counted}


def evaluate_exits(model, tokenizer, exits: ExitHeads | Iterable[int], data: str = "builtin:wiki",
                   split: str = "validation", window: int = 512, max_windows: int | None = None,
                   batch_size: int = 1, progress: bool = True, spread: bool = False) -> dict:
    """Per-exit perplexity and agreement with the final layer on text source `data`.

    `exits`: an ExitHeads (e.g. `load_exits(folder, model)`), or plain layer numbers, read through the
    model's shared final norm. Returns
    `{"final": {"perplexity", "nll_per_token"}, "exits": {"E": {"perplexity", "nll_per_token",
    "agreement"}}, "norm", "num_layers", "windows", "window", "tokens", "source", "split"}`.
    """
    from ..data import load_texts, token_stream

    if not isinstance(exits, ExitHeads):
        exits = ExitHeads.for_model(model, list(exits), "shared")
    stream = token_stream(load_texts(data, split=split, tokenizer=tokenizer), tokenizer)
    figures = exit_figures(model, exits, stream, window=window, batch_size=batch_size,
                           max_windows=max_windows, progress=progress, spread=spread)
    return {**figures, "source": data, "split": split}


def format_exit_table(results: dict) -> str:
    """A plain-text table of `evaluate_exits` results, one row per exit and one for the final layer."""
    rows = [f"{'exit':>6} {'perplexity':>11} {'agreement':>10}"]
    for e, r in results["exits"].items():
        rows.append(f"{e:>6} {r['perplexity']:>11.2f} {r['agreement']:>10.3f}")
    rows.append(f"{'final':>6} {results['final']['perplexity']:>11.2f} {'1.000':>10}")
    return "\n".join(rows)
