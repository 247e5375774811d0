"""loglikelihood() against a hand computation, multiple_choice() on models with a known preference, load_tasks() errors."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.eval import load_tasks, loglikelihood, multiple_choice
from slimlm.toolkit.models import byte_tokenizer, tiny_model


class OneByteLM(nn.Module):
    """Whatever the input, strongly predicts byte `favourite` (logit `strength`, all others 0)."""

    def __init__(self, favourite: int, vocab: int = 259, strength: float = 10.0):
        super().__init__()
        self.favourite, self.vocab, self.strength = favourite, vocab, strength

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # [B, T, V]
        logits[..., self.favourite] = self.strength
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


def hand_loglik(model, ids, n_cont):
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)  # [T-1, V]
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


def test_loglikelihood_matches_hand_computation(llama):
    model, tok = llama
    ctx_ids = tok.encode("The cat", add_special_tokens=False)
    ids = tok.encode("The cat sat on", add_special_tokens=False)
    expected = hand_loglik(model, ids, len(ids) - len(ctx_ids))
    [got] = loglikelihood(model, tok, [("The cat", " sat on")], batch_size=1)
    assert got == pytest.approx(expected, abs=1e-5)
    # Trailing whitespace of the context belongs to the continuation.
    [moved] = loglikelihood(model, tok, [("The cat ", "sat on")], batch_size=1)
    assert moved == pytest.approx(expected, abs=1e-5)


def test_empty_context_is_conditioned_on_bos(llama):
    model, tok = llama
    ids = [tok.bos_token_id] + tok.encode("hi", add_special_tokens=False)
    [got] = loglikelihood(model, tok, [("", "hi")])
    assert got == pytest.approx(hand_loglik(model, ids, 2), abs=1e-5)


class MergingTokenizer:
    """Longest match over a few multi-character pieces, else one byte each: " C" + "elsius" encodes as " Celsius",
    so a context that stops mid-word ends on a token the choice merges into, as a BPE tokenizer's does."""

    pieces = {" Celsius": 300, " C": 301, " is": 302}
    bos_token_id = eos_token_id = 256
    pad_token_id = None

    def decode(self, ids):
        names = {v: k for k, v in self.pieces.items()}
        return "".join(names[i] if i in names else chr(i) for i in ids)

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            piece = next((p for p in sorted(self.pieces, key=len, reverse=True) if text.startswith(p, i)), None)
            ids.append(self.pieces[piece] if piece else text.encode()[i] if text.isascii() else ord(text[i]))
            i += len(piece) if piece else 1
        return ids


def test_a_context_that_stops_mid_word_scores_the_choice_with_its_merged_token():
    from slimlm.toolkit.eval.multiple_choice import _encode_pair

    tok = MergingTokenizer()
    seq, n = _encode_pair(tok, "Water freezes at 0 degrees C", "elsius.", None)
    whole = tok.encode("Water freezes at 0 degrees Celsius.")
    assert seq == whole and seq[-n:] == [300, ord(".")]  # " Celsius" and "." are scored, not "." alone
    seq, n = _encode_pair(tok, "The capital is Par", "is is a city", None)
    assert seq[-n:] == tok.encode("is is a city")  # the choice's own "is" stays in it
    seq, n = _encode_pair(tok, "It is", " cold", None)  # no merge: the split is the context's end
    assert seq[:-n] == tok.encode("It is") and seq[-n:] == tok.encode(" cold")


def test_every_choice_of_a_row_is_scored_from_the_same_token():
    """One choice merges into the context's last token (" C" + "elsius"), the other not ("."): both are scored from
    before " C", so the one that does not merge gets no free context token. Under a model that finds every token
    equally likely, both then score two tokens and tie (the first, the label, wins); split per choice, "." scored
    one token and won."""
    tok = MergingTokenizer()
    rows = [{"context": "Water freezes at 0 degrees C", "choices": ["elsius.", "."], "label": 0}]
    result = multiple_choice(OneByteLM(0, vocab=303, strength=0.0), tok, rows, progress=False)
    assert result["acc"] == 1.0
    # acc_norm divides by the text each scored: " Celsius." and " C." (the context's " C" counted for both)
    from slimlm.toolkit.eval.multiple_choice import _tail_bytes, context_split
    keep = min(context_split(tok, rows[0]["context"], c) for c in rows[0]["choices"])
    assert keep == len(tok.encode("Water freezes at 0 degrees")) and _tail_bytes(tok, rows[0]["context"], keep) == 2
    assert result["acc_norm"] == 1.0  # per byte: the same score spread over 9 bytes beats it over 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_padding_and_batching_do_not_change_logliks(arch):
    model, tok = tiny_model(arch, seed=4)
    pairs = [("Question: what is two plus two? Answer:", " four"), ("A", " b"),
             ("The capital of France is", " Paris, of course."), ("x y z", " w"),
             ("Once upon a time", " there was"), ("Q:", " a much longer answer than the others here"),
             ("", "no context"), ("Short", " one")]
    one = loglikelihood(model, tok, pairs, batch_size=1)
    four = loglikelihood(model, tok, pairs, batch_size=4)
    assert one == pytest.approx(four, abs=1e-5)
    assert len(set(one)) == len(one)  # distinct pairs, distinct scores: results are not shuffled


def test_model_that_prefers_a_byte_picks_that_choice():
    tok = byte_tokenizer()
    model = OneByteLM(ord("a"))
    rows = [{"context": "Q1:", "choices": ["aaa", "bbb"], "label": 0},
            {"context": "Q2: pick", "choices": [" xyz", "aaa", "b"], "label": 1}]
    r = multiple_choice(model, tok, rows, batch_size=2, progress=False)
    assert r == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    flipped = [dict(rows[0], label=1), dict(rows[1], label=2)]
    r = multiple_choice(model, tok, flipped, batch_size=3, progress=True)
    assert r["acc"] == 0.0 and r["acc_norm"] == 0.0


def test_acc_norm_differs_from_acc_when_lengths_differ():
    # "b" costs one unlikely byte; "aaaab" costs the same unlikely byte plus four likely ones.
    # Summed, "b" wins; per byte, "aaaab" wins.
    tok = byte_tokenizer()
    rows = [{"context": "Q:", "choices": ["b", "aaaab"], "label": 1}]
    r = multiple_choice(OneByteLM(ord("a")), tok, rows, progress=False)
    assert r == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_multiple_choice_on_tiny_model_runs(llama):
    model, tok = llama
    rows = [{"context": f"{i} +", "choices": [" one", " two", " three"], "label": i % 3} for i in range(5)]
    r = multiple_choice(model, tok, rows, batch_size=4, progress=False)
    assert r["n"] == 5 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0


GOOD = {"context": "Q:", "choices": [" a", " b"], "label": 1}


def test_load_tasks_reads_rows_and_skips_blank_lines(tmp_path):
    p = tmp_path / "task.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(dict(GOOD, label=0)) + "\n")
    assert load_tasks(p) == [GOOD, dict(GOOD, label=0)]


@pytest.mark.parametrize("bad, why", [
    ({"choices": [" a", " b"], "label": 0}, "missing field(s) context"),
    ({"context": 3, "choices": [" a", " b"], "label": 0}, '"context" must be a string'),
    ({"context": "Q", "choices": " a b", "label": 0}, '"choices" must be a list of strings'),
    ({"context": "Q", "choices": [" a", 2], "label": 0}, '"choices" must be a list of strings'),
    ({"context": "Q", "choices": [" a"], "label": 0}, "at least 2 choices"),
    ({"context": "Q", "choices": [" a", ""], "label": 0}, "empty string"),
    ({"context": "Q", "choices": [" a", " b"], "label": "0"}, '"label" must be an integer'),
    ({"context": "Q", "choices": [" a", " b"], "label": True}, '"label" must be an integer'),
    ({"context": "Q", "choices": [" a", " b"], "label": 2}, "out of range"),
    ({"context": "Q", "choices": [" a", " b"], "label": -1}, "out of range"),
    ([1, 2], "expected a JSON object"),
])
def test_load_tasks_rejects_bad_rows(tmp_path, bad, why):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SlimlmError) as e:
        load_tasks(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and why in msg and '"choices"' in msg.split("\n")[-1]


def test_load_tasks_rejects_invalid_json_with_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(GOOD) + '\n{"context": "Q", "choices": [\n')
    with pytest.raises(SlimlmError, match=r"line 2: invalid JSON"):
        load_tasks(p)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_load_tasks_rejects_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(SlimlmError, match="has no rows"):
        load_tasks(p)


def test_load_tasks_missing_file(tmp_path):
    with pytest.raises(SlimlmError, match="does not exist"):
        load_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(SlimlmError, match="is a folder"):  # was: internal error, IsADirectoryError
        load_tasks(tmp_path)


def test_load_tasks_reads_what_json_and_editors_write(tmp_path):
    """JSON may hold U+2028, U+2029 and U+0085 unescaped in a string (ensure_ascii=False writes them so), and
    Windows editors write a byte-order mark and CRLF: each was refused as invalid JSON."""
    row = dict(GOOD, context="Line one\u2028line two\u2029\u0085 Q:")
    p = tmp_path / "task.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())
    assert load_tasks(p) == [row, GOOD]


def test_multiple_choice_checks_rows_given_directly():
    tok = byte_tokenizer()
    with pytest.raises(SlimlmError, match="row 1: .*out of range"):
        multiple_choice(OneByteLM(97), tok, [GOOD, dict(GOOD, label=5)], progress=False)
    with pytest.raises(SlimlmError, match="no multiple-choice rows"):
        multiple_choice(OneByteLM(97), tok, [], progress=False)
