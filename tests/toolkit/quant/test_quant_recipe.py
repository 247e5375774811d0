"""`recipes/quantize.py` (the `slimlm quantize` verb) end to end on a tiny model, and its refusals."""
import json
import re

import pytest
import torch

from slimlm.recipes.quantize import main
from slimlm.toolkit.export import read
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant.gptq_format import load_gptq, read_gptq_tensors

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times, then rests."
                   for i in range(60))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    model, tok = tiny_model("llama", seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "text.txt"
    path.write_text(TEXT)
    return path


def test_quantize_writes_a_verified_gptq_checkpoint_and_reports_perplexity(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    code = main([str(model_dir), "--out", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--sym", "--act-order", "--data", str(text_file), "--samples", "4", "--seq-len", "64",
                 "--eval-data", str(text_file), "--eval-windows", "2", "--window", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity before" in printed and "perplexity after" in printed and "change" in printed
    manifest = read(out)
    assert manifest.transforms["quant"]["method"] == "gptq"
    assert manifest.transforms["quant"]["calibration"]["samples"] == 4
    before, after = manifest.eval["perplexity_before"], manifest.eval["perplexity_after"]
    assert before > 1 and after > 1 and f"{before:.3f}" in printed and f"{after:.3f}" in printed
    assert manifest.command.startswith("python recipes/quantize.py ")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, True)
    assert len(read_gptq_tensors(out)) == 14
    model, _ = load_gptq(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 259)


def test_rtn_without_eval(model_dir, tmp_path, capsys):
    assert main([str(model_dir), "--out", str(tmp_path / "r"), "--method", "rtn", "--bits", "8",
                 "--group-size", "-1", "--no-eval"]) == 0
    assert read(tmp_path / "r").transforms["quant"]["bits"] == 8
    printed = re.sub(r"[\s│]+", " ", capsys.readouterr().out)  # the table wraps a long path anywhere
    assert "(1 tensor file(s), verified)" in printed  # config.json is hashed too, not counted
    # Quantizing (or pruning) it again read the dequantized int8 weights and dropped the int8 record and head
    from slimlm.recipes.prune import main as prune

    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "rr"), "--method", "rtn", "--no-eval"]) == 2
    assert "is already quantized (GPTQ); quantize would read its dequantized weights" in capsys.readouterr().err
    assert prune([str(tmp_path / "r"), "--out", str(tmp_path / "p"), "--target-params", "0.5"]) == 2
    assert "is already quantized (GPTQ); prune would" in capsys.readouterr().err
    assert not (tmp_path / "rr").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--method", "rtn", "--act-order"], "--act-order is a GPTQ option"),
    (["--group-size", "48"], "group size must be one of"),
    (["--static-groups"], "needs act_order"),
    (["--data", "builtin:nope"], "unknown built-in corpus"),
])
def test_user_errors_exit_2_before_loading(model_dir, tmp_path, capsys, extra, needle):
    assert main([str(model_dir), "--out", str(tmp_path / "x"), *extra]) == 2
    assert needle in capsys.readouterr().err


def test_non_empty_out_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main([str(model_dir), "--out", str(tmp_path / "full"), "--method", "rtn"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_head_the_scheme_cannot_hold_is_refused_before_calibration(model_dir, text_file, tmp_path, capsys):
    # The tiny vocabulary (259 outputs) does not fill whole int32 words of 8 codes.
    assert main([str(model_dir), "--out", str(tmp_path / "h"), "--quantize-lm-head", "int4", "--data", str(text_file),
                 "--samples", "4", "--seq-len", "64", "--no-eval"]) == 2
    assert "lm_head has out_features=259" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_quantize_lm_head_int8_writes_the_head_into_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "tiny264"
    model, tok = tiny_model("llama", seed=0, vocab_size=264)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    out = tmp_path / "q"
    assert main([str(path), "--out", str(out), "--method", "rtn", "--group-size", "32", "--quantize-lm-head", "int8",
                 "--no-eval"]) == 0
    assert "LM head int8" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] is True and qc["dynamic"] == {"+:^lm_head$": {"bits": 8, "group_size": 32}}
    assert read(out).config["quantize_lm_head"] == "int8"
    assert len(read_gptq_tensors(out)) == 15  # 14 decoder linears and the head
    loaded, _ = load_gptq(out)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)  # untied, head quantized


def test_the_notes_say_where_an_export_does_not_load():
    from slimlm.recipes.quantize import engine_notes
    from slimlm.toolkit.quant.scheme import QuantScheme

    assert engine_notes(QuantScheme(sym=True), None) == []
    (asym,) = engine_notes(QuantScheme(sym=False), None)
    assert "Marlin kernels need --sym" in asym and "--dtype float16" not in asym
    assert "--dtype float16" in engine_notes(QuantScheme(sym=False, scale_dtype="bf16"), None)[0]
    (head,) = engine_notes(QuantScheme(sym=True), QuantScheme(bits=8, group_size=-1, sym=True))
    assert "transformers (optimum) and TGI" in head
    (split,) = engine_notes(QuantScheme(sym=True), None, ["model.layers.1.self_attn.k_proj"])
    assert "--skip keeps model.layers.1.self_attn.k_proj dense" in split and "vLLM" in split
