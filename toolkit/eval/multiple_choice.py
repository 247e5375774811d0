"""Multiple-choice accuracy by log-likelihood, scored the way lm-evaluation-harness scores it.

Each choice is a continuation of the context; its score is the summed log-probability of its tokens.
`acc` picks the choice with the highest sum; `acc_norm` divides by the choice's UTF-8 byte length first,
so long answers are not penalised for having more tokens (and tokenizers compare fairly). Where a choice merges
into the context's last token (a context that stops mid-word), every choice of that row is scored from before
that token, and its text counts in each choice's bytes.
Task files are jsonl, one question per line:
    {"context": "Question: ... Answer:", "choices": [" yes", " no"], "label": 0}
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SlimlmError
from ._common import eval_mode, forward_logits, model_device, progress_bar
from .onednn_linear import onednn_linears

EXPECTED = ('one JSON object per line: {"context": str, "choices": [str, str, ...] (at least 2 non-empty), '
            '"label": int (0-based index of the right choice)}')


def load_tasks(path) -> list[dict]:
    """Read a multiple-choice jsonl file into rows {"context", "choices", "label"}; blank lines are skipped.

    Raises SlimlmError naming the file and line for invalid JSON or a malformed row, and for a file
    with no rows.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not JSON
    except FileNotFoundError:
        raise SlimlmError(f"task file {path} does not exist.", f"Expected a jsonl file with {EXPECTED}.") from None
    except IsADirectoryError:
        raise SlimlmError(f"task file {path} is a folder.", f"Pass a jsonl file with {EXPECTED}.") from None
    except PermissionError:
        raise SlimlmError(f"task file {path} cannot be read (permission denied).", "Pass a file you can read.") from None
    except UnicodeDecodeError as e:
        raise SlimlmError(f"task file {path} is not UTF-8 text ({e.reason}).", f"Expected {EXPECTED}.") from None
    rows = []
    # not splitlines(): JSON strings may hold U+2028, U+2029 or U+0085 as they are; \r\n ends a line as \n does
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{path}, line {lineno}: invalid JSON ({e.msg}, column {e.colno}).",
                              f"Expected {EXPECTED}.") from None
        problem = row_problem(row)
        if problem:
            raise SlimlmError(f"{path}, line {lineno}: {problem}.", f"Expected {EXPECTED}.")
        rows.append({"context": row["context"], "choices": list(row["choices"]), "label": row["label"]})
    if not rows:
        raise SlimlmError(f"task file {path} has no rows.", f"Expected {EXPECTED}.")
    return rows


def row_problem(row) -> str | None:
    """What is wrong with one multiple-choice row, or None if it is well formed."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in ("context", "choices", "label") if k not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(row["context"], str):
        return f'"context" must be a string, got {type(row["context"]).__name__}'
    choices = row["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return '"choices" must be a list of strings'
    if len(choices) < 2:
        return f'"choices" must hold at least 2 choices, got {len(choices)}'
    if any(c == "" for c in choices):
        return '"choices" must not contain an empty string (an empty answer has no likelihood to score)'
    label = row["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        return f'"label" must be an integer, got {type(label).__name__}'
    if not 0 <= label < len(choices):
        return f'"label" {label} is out of range for {len(choices)} choices (0 to {len(choices) - 1})'
    return None


def multiple_choice(model, tokenizer, rows: list[dict], batch_size: int = 8, progress: bool = True) -> dict:
    """Accuracy of `model` on multiple-choice `rows` (as returned by `load_tasks`).

    Returns {"acc", "acc_norm", "n"}: the fraction of rows whose highest-scoring choice is the label,
    scoring by summed log-likelihood (acc) or log-likelihood per UTF-8 byte of the choice (acc_norm).
    """
    if not rows:
        raise SlimlmError("no multiple-choice rows to evaluate.", f"Expected {EXPECTED}.")
    for i, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            raise SlimlmError(f"multiple-choice row {i}: {problem}.", f"Expected {EXPECTED}.")
    pairs = [(row["context"], choice) for row in rows for choice in row["choices"]]
    # Every choice of a row is scored from the same token: the earliest where one of them merges into the
    # context's end. Split per choice, a choice that merges would pay for the context's last token and the
    # others not; each then also counts, for acc_norm, the bytes of context text it scores.
    splits = [min(context_split(tokenizer, row["context"], c) for c in row["choices"]) for row in rows]
    extra = [_tail_bytes(tokenizer, row["context"], k) for row, k in zip(rows, splits)]
    keep = [k for row, k in zip(rows, splits) for _ in row["choices"]]
    lls = loglikelihood(model, tokenizer, pairs, batch_size=batch_size, progress=progress, keep=keep)
    correct = correct_norm = 0
    k = 0
    for row, tail in zip(rows, extra):
        n = len(row["choices"])
        scores = lls[k: k + n]
        k += n
        norm = [s / (tail + len(c.encode("utf-8"))) for s, c in zip(scores, row["choices"])]
        correct += _argmax(scores) == row["label"]
        correct_norm += _argmax(norm) == row["label"]
    return {"acc": correct / len(rows), "acc_norm": correct_norm / len(rows), "n": len(rows)}


def loglikelihood(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8,
                  progress: bool = False, keep: list[int] | None = None) -> list[float]:
    """Summed log-probability (nats) of each continuation given its context, for (context, continuation) pairs.

    As lm-eval does: trailing whitespace of the context moves to the continuation, both `context` and
    `context + continuation` are encoded without special tokens, and the continuation tokens are those
    after the context's tokens; an empty context is replaced by the bos (or eos) token. Pairs run in
    batches, longest first, right-padded; results come back in the order of `pairs`.
    """
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}.")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    keep = keep or [None] * len(pairs)
    items = [_encode_pair(tokenizer, ctx, cont, max_len, k) for (ctx, cont), k in zip(pairs, keep)]  # (ids, n_cont)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    out: list[float] = [0.0] * len(items)
    with eval_mode(model), torch.inference_mode(), onednn_linears(model), progress_bar(progress) as bar:
        task = bar.add_task("log-likelihood", total=len(items))
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            seqs = [items[i][0] for i in idx]
            width = max(len(s) - 1 for s in seqs)  # the last token is only a target
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # input_ids: [B, L]
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # mask: [B, L]
            for b, s in enumerate(seqs):
                input_ids[b, : len(s) - 1] = torch.tensor(s[:-1])
                mask[b, : len(s) - 1] = 1
            logits = forward_logits(model, input_ids.to(device), mask.to(device))  # logits: [B, L, V]
            for b, i in enumerate(idx):
                seq, n_cont = items[i]
                end = len(seq) - 1  # logits at position t predict seq[t + 1]
                targets = torch.tensor(seq[-n_cont:], device=logits.device)  # targets: [C]
                logp = logits[b, end - n_cont: end].float().log_softmax(-1)  # logp: [C, V]
                out[i] = logp.gather(-1, targets[:, None]).sum().item()
            del logits
            bar.advance(task, len(idx))
    return out


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """"Answer: " + "yes" scores " yes", the way the tokenizer would see it in running text."""
    n_spaces = len(context) - len(context.rstrip())
    return (context[:-n_spaces], context[-n_spaces:] + continuation) if n_spaces else (context, continuation)


def context_split(tokenizer, context: str, continuation: str) -> int:
    """How many of the context's tokens the whole text's encoding keeps as they are. A context that stops inside a
    word ("... 0 degrees C" + "elsius.") ends on a token the choice merges into (" C" + "elsius" is " Celsius"):
    split there, or the tokens past the context's would score the wrong text."""
    context, continuation = _move_space(context, continuation)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return next((i for i, (a, b) in enumerate(zip(ctx, whole)) if a != b), min(len(ctx), len(whole)))


def _encode_pair(tokenizer, context: str, continuation: str, max_len: int | None,
                 keep: int | None = None) -> tuple[list[int], int]:
    """Token ids of context+continuation and how many of them (at the end) are scored: those after the first
    `keep` tokens (default `context_split`; a multiple-choice row gives all its choices the same split)."""
    context, continuation = _move_space(context, continuation)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    k = context_split(tokenizer, context, continuation) if keep is None else keep
    ctx, cont = whole[:k], whole[k:]
    if not cont:
        raise SlimlmError(f"the continuation {continuation!r} after context {context[-40:]!r} encodes to no tokens.",
                          "Each choice must add text after the context.")
    if not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise SlimlmError("a row has an empty context and the tokenizer has no bos or eos token to stand in.",
                              "Give every row a non-empty context.")
        ctx = [prefix]
    seq = ctx + cont
    if max_len is not None and len(seq) - 1 > max_len:
        if len(cont) > max_len:
            raise SlimlmError(f"a choice of {len(cont)} tokens is longer than the model's context ({max_len}).")
        seq = seq[-(max_len + 1):]  # keep the end: drop the oldest context tokens
    return seq, len(cont)


def _tail_bytes(tokenizer, context: str, keep: int) -> int:
    """UTF-8 bytes of the context's text past its first `keep` tokens (scored with the choices)."""
    context = context.rstrip()
    ids = tokenizer.encode(context, add_special_tokens=False)
    if keep >= len(ids):
        return 0
    return max(0, len(context.encode("utf-8")) - len(tokenizer.decode(ids[:keep]).encode("utf-8")))


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])  # first index on ties
