"""One table for an evaluation run: a row per figure, so runs of different models line up.

`results` is {"model": str, "perplexity": {source: perplexity() dict}, "tasks": {task: multiple_choice() dict}};
either section may be missing or empty.
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def results_table(results: dict) -> Table:
    """A rich Table with columns source | eval | metric | value | n, one row per figure.

    Perplexity sources give a `perplexity` row and, when known, a `bits/byte` row (both with eval
    "perplexity"); tasks give `acc` and `acc_norm` rows (eval "multiple choice").
    """
    table = Table(title=f"eval: {results.get('model', '?')}")
    table.add_column("source")
    table.add_column("eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for source, r in (results.get("perplexity") or {}).items():
        n = f"{r['tokens']:,} tokens"
        table.add_row(source, "perplexity", "perplexity", f"{r['perplexity']:.2f}", n)
        if r.get("bits_per_byte") is not None:
            table.add_row(source, "perplexity", "bits/byte", f"{r['bits_per_byte']:.3f}", n)
    for task, r in (results.get("tasks") or {}).items():
        n = f"{r['n']:,} questions"
        table.add_row(task, "multiple choice", "acc", f"{r['acc']:.3f}", n)
        table.add_row(task, "multiple choice", "acc_norm", f"{r['acc_norm']:.3f}", n)
    return table


def print_results(results: dict, console: Console | None = None) -> None:
    """Print `results_table(results)` to `console` (default: a new stdout console)."""
    (console or Console()).print(results_table(results))
