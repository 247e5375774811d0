"""The text of a completion as its tokens grow, decoding a few tokens per step instead of all of them.

Decoding every output token again at each step costs O(n) a step, O(n^2) a request. Here each update
decodes only a window: the tokens since the last point where the text was complete (`prefix`), with
and without the tokens that arrived since (`read`), and appends the difference. Decoding the window
with its left context keeps what a tokenizer does at a boundary (SentencePiece drops the leading space
of the first token it decodes: both decodes drop it alike). A window whose text ends in U+FFFD (a
character whose bytes are not all there yet) waits for its next token, unless the completion is
finished, where the full decode would keep it too. `tests/serve/test_detokenizer.py` checks the text
against one decode of all tokens on random ids.
"""
from __future__ import annotations


class IncrementalText:
    """`update(ids, final)` -> the text of `ids` (a list that only grows), decoded a window at a time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> str:
        if len(ids) < self.read:  # tokens taken back (never expected): start again from the whole list
            self.text, self.prefix, self.read = "", 0, 0
        if len(ids) == self.read:
            return self.text
        before = self._decode(ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = self._decode(ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(ids)
        return self.text
