"""`load_texts`: one string spec for every text source, returning a list of documents.

| spec                           | what is read                                                       |
|--------------------------------|--------------------------------------------------------------------|
| `builtin:NAME`                 | a built-in offline corpus (see `builtin.py`), split train/validation |
| `path/to/file.txt`             | UTF-8 text; documents are separated by blank lines                 |
| `path/to/file.jsonl`           | one JSON object a line, with a `text` string, or `messages` (a list  |
|                                | of {role, content}) rendered by the tokenizer's chat template       |
| `path/to/file.parquet`         | the `text` column                                                   |
| `hf:<id>[:config][:split]`     | `datasets.load_dataset(id, config, split=...)`, `text` column;      |
|                                | a split in the spec wins over the `split` argument (`hf:id::test`  |
|                                | gives a split without a config); rows that are lines of one text    |
|                                | (each ends with a newline, as wikitext's) are joined back into it   |

Local files are used whole: the `split` argument does not apply to them (keep held-out text in
its own file). Empty or whitespace-only documents (rows) are dropped. Only `datasets`/`pyarrow`
readers are imported lazily, so the toolkit itself needs neither unless such a source is used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import SlimlmError
from .builtin import BUILTIN_CORPORA, builtin_documents, check_builtin_name, split_documents

SUFFIXES = (".txt", ".jsonl", ".parquet")
BLANK_LINES = r"\n(?:[ \t]*\n)+"  # one or more blank lines end a .txt document


def load_texts(spec: str, split: str = "validation", tokenizer=None) -> list[str]:
    """Return the documents named by `spec` (see the module table), in source order.

    `split` selects the part of a built-in corpus ("train": the first 90% of its text, "validation":
    the last 10%, both in whole documents) or the split of a hub dataset; it is ignored for local files. `tokenizer` is needed
    only for `.jsonl` rows with `messages`, which are rendered with its chat template.
    Raises `SlimlmError` for anything that cannot be read, with what to do about it.
    """
    if spec.startswith("builtin:"):
        return builtin_documents(spec[len("builtin:"):], split)
    if spec.startswith("hf:"):
        return _load_hub(spec, split)
    return _load_local(Path(spec).expanduser(), tokenizer)


def check_source(spec: str) -> None:
    """Refuse a spec that cannot name a readable source, without reading it.

    Lets a command fail on a typo before it spends time loading a model.
    """
    if spec.startswith("builtin:"):
        check_builtin_name(spec[len("builtin:"):])
    elif spec.startswith("hf:"):
        parse_hub_spec(spec)
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise SlimlmError(f"loading {spec!r} needs the `datasets` package, which is not installed.",
                              "Install it (`pip install datasets`), or pass a local file.")
    else:
        _check_local(Path(spec).expanduser())


# ---------------------------------------------------------------- local files

def _check_local(path: Path) -> str:
    """Return the (lower-case) suffix of an existing, supported local file; refuse anything else."""
    if not path.exists():
        hint = "Check the path, or use a built-in corpus ('builtin:wiki', ...) or 'hf:<dataset id>'."
        if str(path) in BUILTIN_CORPORA:
            hint = f"To use the built-in corpus, write 'builtin:{path}'."
        raise SlimlmError(f"text source {str(path)!r} does not exist.", hint)
    if path.is_dir():
        raise SlimlmError(f"text source {str(path)!r} is a folder, not a file.",
                          f"Pass one {'/'.join(SUFFIXES)} file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SlimlmError(
            f"cannot read {str(path)!r}: unknown file type {suffix or '(no extension)'!r}.",
            "Supported: .txt (documents separated by blank lines), .jsonl (a 'text' or 'messages' "
            "field per line), .parquet (a 'text' column). Rename or convert the file.")
    return suffix


def _load_local(path: Path, tokenizer) -> list[str]:
    suffix = _check_local(path)
    if suffix == ".parquet":
        docs = _read_parquet(path)
    elif suffix == ".txt":
        docs = split_documents(_read_text(path), BLANK_LINES)
    else:
        docs = _parse_jsonl(path, _read_text(path), tokenizer)
    if not docs:
        raise SlimlmError(f"{str(path)!r} holds no non-empty document.",
                          "Check that the file has text in it (a 'text' field or column).")
    return docs


def _read_text(path: Path) -> str:
    """Decode `path` as UTF-8, refusing binary files and empty ones with a clear message."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise SlimlmError(f"{str(path)!r} looks binary (it contains NUL bytes), not text.",
                          "Pass a UTF-8 text file (.txt/.jsonl), or a .parquet file under its own name.")
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise SlimlmError(f"{str(path)!r} is not valid UTF-8 (byte {e.start}: {e.reason}).",
                          "Convert it to UTF-8 (e.g. `iconv -t UTF-8`), or check it is a text file.") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows' and old Macs' line ends
    if not text.strip():
        raise SlimlmError(f"{str(path)!r} is empty (or holds only whitespace).",
                          "Pass a file with text in it.")
    return text


def _parse_jsonl(path: Path, text: str, tokenizer) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028 as is
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).",
                              "Each line of a .jsonl file must be one JSON object, e.g. "
                              '{"text": "..."}.') from e
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            doc = row["text"]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            doc = _render_chat(where, row["messages"], tokenizer)
        else:
            if isinstance(row, dict) and ("text" in row or "messages" in row):
                key = "text" if "text" in row else "messages"
                got = f"'{key}' as {json.dumps(row[key])[:40]} ({type(row[key]).__name__})"
            else:
                got = f"the keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
            raise SlimlmError(
                f"{where}: expected a 'text' string or a 'messages' list, got {got}.",
                'Write each row as {"text": "..."} or {"messages": [{"role": "user", '
                '"content": "..."}, ...]}.')
        if doc.strip():
            docs.append(doc)
    return docs


def _render_chat(where: str, messages: list, tokenizer) -> str:
    if tokenizer is None:
        raise SlimlmError(f"{where}: a 'messages' row needs a tokenizer to apply its chat template.",
                          "Pass tokenizer=... to load_texts (the model's tokenizer), or give rows a "
                          "'text' field instead.")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in messages):
        raise SlimlmError(f"{where}: every message must be {{'role': str, 'content': str}}.",
                          'E.g. {"messages": [{"role": "user", "content": "Hi"}]}.')
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # no template (ValueError), or the template refused them (jinja2's TemplateError:
        # "roles must alternate", a system message it does not take)
        raise SlimlmError(f"{where}: the tokenizer's chat template could not render these messages: "
                          f"{type(e).__name__}: {e}",
                          "Fix the row's messages to what the template accepts (e.g. alternating user and "
                          "assistant roles), use a tokenizer with a chat template, or give rows a 'text' field.") from e


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq  # comes with `datasets`
    except ImportError as e:
        raise SlimlmError("reading .parquet files needs pyarrow, which is not installed.",
                          "Install it (`pip install pyarrow`, or `datasets`), or use .jsonl.") from e
    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise SlimlmError(f"{str(path)!r} has no 'text' column (columns: {', '.join(schema.names)}).",
                              "Name the column with the documents 'text'.")
        column = pq.read_table(path, columns=["text"]).column("text")
    except SlimlmError:
        raise
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) on a damaged or non-parquet file
        raise SlimlmError(f"{str(path)!r} could not be read as parquet: {e}",
                          "Check the file is a valid parquet file.") from e
    values = column.to_pylist()
    if not all(v is None or isinstance(v, str) for v in values):
        raise SlimlmError(f"{str(path)!r}: the 'text' column holds {column.type}, not strings.",
                          "Store the documents as a string column named 'text'.")
    return [v for v in values if v is not None and v.strip()]


# ---------------------------------------------------------------- hub datasets

def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """hf:<id>[:config][:split] -> (id, config or None, split or None)."""
    parts = spec[len("hf:"):].split(":")
    if len(parts) > 3 or not parts[0]:
        raise SlimlmError(f"cannot parse the hub spec {spec!r}.",
                          "Write hf:<dataset id>[:config][:split], e.g. hf:wikitext:wikitext-2-raw-v1:test.")
    return parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 and parts[2] else None)


WIKITEXT_TITLE = re.compile(r" = [^=].* = ")  # an article's first line in wikitext (" = = Part = = " is a section)
MAX_JOINED_CHARS = 1 << 20  # past this a joined text is cut at its next blank line: memory stays bounded


def rows_to_documents(rows: list) -> list[str]:
    """A text column's rows as documents. Where every non-blank row is one line ending with its newline, the rows
    are the lines of a text (wikitext stores its files so, an empty row for each blank line): they are joined back
    into it, so no end-of-text token lands between lines (one after each line raised SmolLM2's perplexity on such
    rows by 13%), a document per article (a wikitext title line starts one) or per ~1 MB cut at a blank line.
    Otherwise each non-blank row is a document."""
    texts = [t for t in rows if isinstance(t, str)]
    lines = [t for t in texts if t.strip()]
    if len(lines) < 2 or not all(t.endswith("\n") and "\n" not in t[:-1] for t in lines):
        return lines
    docs, parts, size = [], [], 0
    for t in texts:
        if parts and (WIKITEXT_TITLE.fullmatch(t.rstrip("\n")) or (size > MAX_JOINED_CHARS and not t.strip())):
            docs.append("".join(parts))
            parts, size = [], 0
        parts.append(t if t.strip() else "\n")
        size += len(t)
    docs.append("".join(parts))
    return [d.strip("\n") + "\n" for d in docs if d.strip()]


def _load_hub(spec: str, split: str) -> list[str]:
    name, config, spec_split = parse_hub_spec(spec)
    split = spec_split or split
    try:
        import datasets
    except ImportError as e:
        raise SlimlmError(f"loading {spec!r} needs the `datasets` package, which is not installed.",
                          "Install it (`pip install datasets`), or pass a local file.") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ConnectionError as e:
        raise SlimlmError(f"could not reach the Hugging Face hub to load {spec!r} ({e}).",
                          "Check the network (and HF_HUB_OFFLINE), or download the data and pass a local "
                          ".txt/.jsonl/.parquet file, or use a built-in corpus such as 'builtin:wiki'.") from e
    except Exception as e:  # not found, gated, bad config or split: datasets explains which
        raise SlimlmError(f"could not load {spec!r} (dataset {name!r}, config {config!r}, split {split!r}): {e}",
                          "Check the dataset id, config and split names, or pass a local file.") from e
    if "text" not in ds.column_names:
        raise SlimlmError(f"{spec!r} has no 'text' column (columns: {', '.join(ds.column_names)}).",
                          "Convert it to a .jsonl or .parquet file with a 'text' field.")
    docs = rows_to_documents(ds["text"])
    if not docs:
        raise SlimlmError(f"{spec!r} holds no non-empty text.", "Check the split and config.")
    return docs
