"""Incremental detokenization against one decode of all tokens, on random ids fed in random chunks."""
import random

import pytest

from slimlm.serve.engine.detokenizer import IncrementalText
from slimlm.toolkit.models import tiny_model


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from slimlm.toolkit.models.builtin import builtin_model_dir

    return AutoTokenizer.from_pretrained(str(builtin_model_dir("smollm2-135m")))


def tiny_tokenizer():
    return tiny_model("llama")[1]


@pytest.mark.parametrize("make", [smollm2_tokenizer, tiny_tokenizer])
def test_the_text_is_the_whole_decode_at_every_step(make):
    tok = make()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    vocab = len(tok)
    # Ids of single bytes of multi-byte characters (byte-level BPE: among the first ids) make incomplete
    # characters likely.
    pieces = [i for i in range(min(vocab, 2000)) if "\ufffd" in decode([i])] or list(range(vocab))
    for trial in range(40):
        ids, inc = [], IncrementalText(tok)
        while len(ids) < 60:
            for _ in range(rng.choice([1, 1, 1, 2, 4])):  # a speculative step appends several tokens
                ids.append(rng.choice(pieces) if rng.random() < 0.3 else rng.randrange(vocab))
            text, whole = inc.update(ids), decode(ids)
            # The text is the decode of the ids so far, less a trailing incomplete character while one waits.
            assert whole.startswith(text) and text == decode(ids[:inc.read])
            if not whole.endswith("\ufffd"):
                assert text == whole
        assert inc.update(ids, final=True) == decode(ids)


def test_words_keep_their_spaces_across_windows():
    tok = smollm2_tokenizer()
    ids = tok("The capital of France is Paris. Ünïcödé → 漢字 and emoji 🙂 too.").input_ids
    inc = IncrementalText(tok)
    texts = [inc.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert texts[-1] == tok.decode(ids, skip_special_tokens=True)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # it only ever grows
