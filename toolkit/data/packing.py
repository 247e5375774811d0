"""From documents to token tensors: one joined stream, fixed blocks of it, or random windows of it.

All three share `token_stream`, so packed training blocks, calibration windows and the evaluation
windows (perplexity over non-overlapping windows of the stream) see the same tokens: every document
tokenized without special tokens, with the tokenizer's EOS id between consecutive documents.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SlimlmError

BATCH_DOCS = 256  # documents per tokenizer call: fast tokenizers parallelize within one call


def token_stream(texts: Sequence[str], tokenizer, add_eos: bool = True) -> torch.LongTensor:
    """Tokenize `texts` and join them into one stream, `[T]` (int64).

    Each document is tokenized with `add_special_tokens=False` (no BOS per document); when `add_eos`,
    the tokenizer's `eos_token_id` goes between consecutive documents (not after the last), so a
    model sees where one document ends and the next begins. Documents that give no tokens are skipped.
    """
    if isinstance(texts, str):
        raise SlimlmError("token_stream got one string, expected a list of documents.",
                          "Wrap it in a list: [text].")
    if not texts:
        raise SlimlmError("no documents to tokenize.", "Pass a non-empty list of texts.")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise SlimlmError("the tokenizer has no eos_token_id to put between documents.",
                          "Set tokenizer.eos_token, or pass add_eos=False.")
    pieces: list[torch.Tensor] = []
    sep = torch.tensor([eos if add_eos else 0], dtype=torch.long)
    for i in range(0, len(texts), BATCH_DOCS):
        # verbose=False: documents longer than model_max_length are fine here, we cut them ourselves
        batch = tokenizer(list(texts[i:i + BATCH_DOCS]), add_special_tokens=False,
                          return_attention_mask=False, verbose=False)["input_ids"]
        for ids in batch:
            if not ids:
                continue
            if add_eos and pieces:
                pieces.append(sep)
            pieces.append(torch.tensor(ids, dtype=torch.long))
    if not pieces:
        raise SlimlmError(f"the {len(texts)} documents gave no tokens (all empty?).",
                          "Check the text source.")
    return torch.cat(pieces)  # [T]


def pack(texts: Sequence[str], tokenizer, block_len: int, add_eos: bool = True) -> torch.LongTensor:
    """Cut the token stream of `texts` into non-overlapping blocks: `[N, block_len]` (int64).

    Blocks run across document boundaries (the EOS between documents marks them); the last,
    incomplete block is dropped, so `pack(...).flatten()` is a prefix of `token_stream(...)`.
    """
    _check_positive("block_len", block_len)
    stream = token_stream(texts, tokenizer, add_eos)  # [T]
    n_blocks = stream.numel() // block_len
    if n_blocks == 0:
        raise SlimlmError(
            f"the text gives {stream.numel()} tokens, fewer than one block of {block_len}.",
            "Use more text or a smaller block length.")
    return stream[: n_blocks * block_len].view(n_blocks, block_len)  # [N, block_len]


def calibration_samples(texts: Sequence[str], tokenizer, n: int, length: int,
                        seed: int = 0) -> torch.LongTensor:
    """`n` windows of `length` tokens from the token stream of `texts`: `[n, length]` (int64).

    Start offsets are drawn uniformly from a `torch.Generator` seeded with `seed` (independent of
    the global RNG), so the same texts, tokenizer and seed give the same samples in every run.
    Windows may overlap; with `n * length` much larger than the stream they repeat text.
    """
    _check_positive("n", n)
    _check_positive("length", length)
    stream = token_stream(texts, tokenizer)  # [T]
    if stream.numel() < length:
        raise SlimlmError(
            f"the text gives {stream.numel()} tokens, fewer than one sample of {length}.",
            "Use more text or a shorter sample length.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length + 1, (n,), generator=gen)  # [n]
    index = starts[:, None] + torch.arange(length)  # [n, length]
    return stream[index]  # [n, length]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SlimlmError(f"{name} must be a positive integer, got {value!r}.")
