"""Text sources and packing: everything that turns text into token tensors.

- `load_texts(spec, split, tokenizer)`: documents from a built-in corpus (`builtin:wiki`), a local
  .txt/.jsonl/.parquet file, or a hub dataset (`hf:<id>[:config][:split]`). See `sources.py`.
- `BUILTIN_CORPORA`: the six offline corpora, their document rules and train/validation split.
  See `builtin.py` for the table.
- `token_stream`, `pack`, `calibration_samples`: the joined token stream `[T]`, training blocks
  `[N, block_len]`, and seeded calibration windows `[n, length]`. See `packing.py`.
"""
from .builtin import BUILTIN_CORPORA, BuiltinCorpus
from .packing import calibration_samples, pack, token_stream
from .sources import check_source, load_texts, parse_hub_spec

__all__ = ["BUILTIN_CORPORA", "BuiltinCorpus", "calibration_samples", "check_source", "load_texts", "pack", "parse_hub_spec", "token_stream"]
