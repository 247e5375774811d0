"""perplexity(): against hand-computed NLL, on models whose logits are known exactly, and its errors."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.eval import perplexity
from slimlm.toolkit.models import tiny_model


class UniformLM(nn.Module):
    """Uniform logits over `vocab`: every token has probability 1/vocab, so perplexity == vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.calls = vocab, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.clone())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))  # [B, T, V]


def hand_nll(model, tokens, window, n_windows):
    """Total NLL (nats) by a plain loop over non-overlapping windows."""
    total = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            w = tokens[i * window: (i + 1) * window]
            logits = model(input_ids=w[None]).logits[0].float()  # [W, V]
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
    return total


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (300,), generator=g)


def test_uniform_logits_give_perplexity_vocab_and_non_overlapping_windows():
    model = UniformLM(vocab=50)
    tokens = torch.arange(105) % 50
    r = perplexity(model, tokens, window=10, batch_size=3, progress=False)
    assert r["perplexity"] == pytest.approx(50.0, rel=1e-6)
    assert r["nll_per_token"] == pytest.approx(math.log(50), rel=1e-6)
    assert r["windows"] == 10 and r["window"] == 10 and r["tokens"] == 10 * 9
    assert r["bits_per_byte"] is None and r["bytes"] is None
    # The model saw exactly the first 100 tokens, each once, in order, in windows of 10; tail dropped.
    assert [c.shape[0] for c in model.calls] == [3, 3, 3, 1]
    seen = torch.cat(model.calls)  # [10, 10]
    assert torch.equal(seen, tokens[:100].view(10, 10))


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_matches_hand_loop(llama, stream, batch_size):
    model, _ = llama
    r = perplexity(model, stream, window=32, batch_size=batch_size, progress=False)
    assert r["windows"] == 9 and r["tokens"] == 9 * 31
    expected = hand_nll(model, stream, 32, 9) / (9 * 31)
    assert r["nll_per_token"] == pytest.approx(expected, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_max_windows_keeps_the_first_windows(llama, stream):
    model, _ = llama
    r = perplexity(model, stream, window=32, batch_size=3, max_windows=5, progress=False)
    assert r["windows"] == 5 and r["tokens"] == 5 * 31
    assert r["nll_per_token"] == pytest.approx(hand_nll(model, stream, 32, 5) / (5 * 31), rel=1e-5)
    # More windows asked than there are: all complete windows.
    assert perplexity(model, stream, window=32, max_windows=100, progress=False)["windows"] == 9


def test_spread_takes_windows_evenly_over_the_stream():
    model = UniformLM(vocab=50)
    tokens = torch.arange(105) % 50  # 10 windows of 10
    r = perplexity(model, tokens, window=10, batch_size=2, max_windows=3, spread=True, progress=False)
    assert r["windows"] == 3 and r["spread"] is True and r["tokens"] == 3 * 9
    seen = torch.cat(model.calls)  # windows 0, 3, 6 (i * 10 // 3)
    assert torch.equal(seen, tokens[:100].view(10, 10)[[0, 3, 6]])
    # All windows asked for (or more): every window, in order, and nothing called spread.
    model.calls.clear()
    assert perplexity(model, tokens, window=10, max_windows=10, spread=True, progress=False)["spread"] is False
    assert torch.equal(torch.cat(model.calls), tokens[:100].view(10, 10))


def test_spread_windows_score_as_the_same_windows_by_hand(llama, stream):
    model, _ = llama
    r = perplexity(model, stream, window=32, batch_size=2, max_windows=4, spread=True, progress=False)
    picked = torch.cat([stream[i * 32: (i + 1) * 32] for i in (0, 2, 4, 6)])  # i * 9 // 4
    assert r["nll_per_token"] == pytest.approx(hand_nll(model, picked, 32, 4) / (4 * 31), rel=1e-5)


def test_bf16_model_scores_in_fp32():
    model, _ = tiny_model("qwen3", seed=2, dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(3))
    r = perplexity(model, tokens, window=32, batch_size=2, progress=False)
    expected = hand_nll(model, tokens, 32, 3) / (3 * 31)
    assert r["nll_per_token"] == pytest.approx(expected, rel=1e-4)


def test_bits_per_byte_against_hand_count(llama):
    model, tok = llama
    docs = ["hello world, this is a test.", "the quick brown fox jumps over the lazy dog"] * 4
    ids = []
    for d in docs:  # documents joined by eos, as the data module's token_stream builds them
        ids += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    tokens = torch.tensor(ids)
    window = 24
    r = perplexity(model, tokens, window=window, batch_size=2, progress=True, tokenizer=tok)
    n = tokens.numel() // window
    windows = tokens[: n * window].view(n, window)
    # ASCII through a byte tokenizer: one byte per predicted non-eos token; eos carries no text.
    hand_bytes = int((windows[:, 1:] != tok.eos_token_id).sum())
    assert r["bytes"] == hand_bytes
    total_nll = hand_nll(model, tokens, window, n)
    assert r["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / hand_bytes, rel=1e-5)


def test_stream_shorter_than_a_window_is_a_user_error(llama):
    model, _ = llama
    with pytest.raises(SlimlmError) as e:
        perplexity(model, torch.arange(100), window=512, progress=False)
    assert "100 tokens" in str(e.value) and "--window" in str(e.value)


def test_window_longer_than_model_context_is_a_user_error(llama):
    model, _ = llama  # max_position_embeddings = 1024
    with pytest.raises(SlimlmError, match="--window 1024"):
        perplexity(model, torch.zeros(2100, dtype=torch.long), window=2048, progress=False)


def test_restores_train_mode(llama):
    model, _ = llama
    model.train()
    try:
        perplexity(model, torch.arange(64), window=32, progress=False)
        assert model.training
    finally:
        model.eval()


def test_two_sources_of_one_file_name_keep_both_results(llama, tmp_path):
    """`--data d1/val.txt --data d2/val.txt`: each keeps its row (labelled by its path), neither overwrites."""
    from slimlm.toolkit.eval import evaluate
    from slimlm.toolkit.eval.evaluate import source_names

    model, tok = llama
    for folder, word in (("d1", "apple"), ("d2", "zebra quartz")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "val.txt").write_text("\n\n".join(f"{word} {i} " * 20 for i in range(6)))
    specs = [str(tmp_path / "d1" / "val.txt"), str(tmp_path / "d2" / "val.txt"), "builtin:wiki"]
    out = evaluate(model, tok, data=specs[:2], window=16, max_windows=2, progress=False)
    assert list(out["perplexity"]) == specs[:2]
    first, second = (out["perplexity"][s]["perplexity"] for s in specs[:2])
    assert first != second
    assert source_names([specs[0], specs[2]]) == ["val.txt", "wiki"]  # no clash: the short labels stay
