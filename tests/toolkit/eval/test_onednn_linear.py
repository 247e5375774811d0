"""onednn_linears: float32 CPU linears through oneDNN during evaluation, the same numbers to rounding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.toolkit.eval import onednn_linear as O
from slimlm.toolkit.eval.perplexity import perplexity
from slimlm.toolkit.models import tiny_model

pytestmark = pytest.mark.skipif(not O.available(), reason="this PyTorch build has no oneDNN (mkldnn) CPU backend")


def counting(monkeypatch):
    calls = []
    real = O._linear

    def spy(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)
    monkeypatch.setattr(O, "_linear", spy)
    return calls


def test_large_inputs_go_through_onednn_and_match_f_linear(monkeypatch):
    calls = counting(monkeypatch)
    lin = nn.Linear(96, 160)
    g = torch.Generator().manual_seed(0)
    for shape in [(O.MIN_ROWS, 96), (2, O.MIN_ROWS, 96), (3, 100, 96)]:
        x = torch.randn(*shape, generator=g)
        with torch.inference_mode():
            want = F.linear(x, lin.weight, lin.bias)
            with O.onednn_linears(lin) as n:
                got = lin(x)
        assert n == 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == [(O.MIN_ROWS, 96), (2, O.MIN_ROWS, 96), (3, 100, 96)]
    assert "forward" not in vars(lin)  # the class's forward again


def test_small_inputs_autograd_and_other_dtypes_keep_f_linear(monkeypatch):
    calls = counting(monkeypatch)
    lin = nn.Linear(32, 32)
    with O.onednn_linears(lin):
        with torch.inference_mode():
            lin(torch.randn(O.MIN_ROWS - 1, 32))             # too few rows
        out = lin(torch.randn(O.MIN_ROWS, 32))                # autograd on: training must not change
        assert out.requires_grad
    assert calls == []
    half = nn.Linear(32, 32).to(torch.bfloat16)
    with O.onednn_linears(half) as n:
        assert n == 0                                         # only float32 weights are patched


def test_modules_restored_after_an_error():
    lin = nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match="boom"):
        with O.onednn_linears(lin):
            assert "forward" in vars(lin)
            raise RuntimeError("boom")
    assert "forward" not in vars(lin)


def test_perplexity_is_the_same_through_onednn(monkeypatch):
    hf, _ = tiny_model("llama", seed=3)
    tokens = torch.randint(0, hf.config.vocab_size, (4 * 128,), generator=torch.Generator().manual_seed(1))
    calls = counting(monkeypatch)
    fast = perplexity(hf, tokens, window=128, batch_size=4, progress=False)   # 512 rows a call: oneDNN
    assert calls, "oneDNN was not used"
    monkeypatch.setattr(O, "available", lambda: False)
    plain = perplexity(hf, tokens, window=128, batch_size=4, progress=False)
    assert fast["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)


def test_a_nested_block_leaves_the_outer_patch_in_place():
    lin = nn.Linear(8, 8)
    with O.onednn_linears(lin) as outer:
        with O.onednn_linears(lin) as inner:
            assert (outer, inner) == (1, 0)
        assert "forward" in vars(lin)      # still the outer block's
    assert "forward" not in vars(lin)
