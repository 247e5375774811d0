"""The writer: never a half export, never a silent overwrite, GGUF quantizers cleared."""
import json
import os
import types

import pytest
from transformers import AutoModelForCausalLM
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.utils.quantization_config import GgufConfig

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import is_export, read, write
from slimlm.toolkit.export import writer as writer_mod
from slimlm.toolkit.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=7)


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


def _exports_in(folder):
    return [p for p in folder.rglob("*") if p.is_dir() and is_export(p)]


def test_non_empty_target_refused_then_replaced(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless told")
    with pytest.raises(SlimlmError, match="overwrite"):
        write(*tiny, out)
    assert (out / "old.txt").read_text() == "keep me unless told"
    write(*tiny, out, overwrite=True)
    assert not (out / "old.txt").exists()
    read(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup left


def test_every_file_gets_the_mode_the_umask_gives(tmp_path, tiny):
    # safetensors writes 0600; a server running as another user must still read the export (umask 022: 0644)
    old = os.umask(0o022)
    try:
        out = write(*tiny, tmp_path / "out", extra_tensors={"early_exit.safetensors": {"w": tiny[0].lm_head.weight}})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


def test_empty_target_is_used(tmp_path, tiny):
    (tmp_path / "out").mkdir()
    read(write(*tiny, tmp_path / "out"))


def test_file_target_refused(tmp_path, tiny):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SlimlmError, match="is a file"):
        write(*tiny, tmp_path / "out", overwrite=True)


def test_overwrite_refuses_current_directory(tmp_path, tiny, monkeypatch):
    out = tmp_path / "out"
    (out / "inner").mkdir(parents=True)
    monkeypatch.chdir(out / "inner")
    with pytest.raises(SlimlmError, match="refusing to overwrite"):
        write(*tiny, out, overwrite=True)
    assert (out / "inner").is_dir()


def test_crash_mid_write_leaves_nothing(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(writer_mod, "describe_files", _crash)  # weights written, manifest not yet
    with pytest.raises(RuntimeError, match="simulated"):
        write(*tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_overwrite_keeps_old_export(tmp_path, tiny, monkeypatch):
    out = write(*tiny, tmp_path / "out", meta={"command": "first"})
    monkeypatch.setattr(writer_mod, "describe_files", _crash)
    with pytest.raises(RuntimeError, match="simulated"):
        write(*tiny, out, meta={"command": "second"}, overwrite=True)
    assert read(out).command == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_swap_restores_old_export(tmp_path, tiny, monkeypatch):
    out = write(*tiny, tmp_path / "out", meta={"command": "first"})

    class FailingRename:  # os, except that publishing the new folder fails
        def __getattr__(self, name):
            return getattr(os, name)

        def rename(self, src, dst):
            if ".slimlm-tmp-" in str(src):
                raise OSError("simulated rename failure")
            os.rename(src, dst)

    monkeypatch.setattr(writer_mod, "os", FailingRename())
    with pytest.raises(OSError, match="simulated"):
        write(*tiny, out, meta={"command": "second"}, overwrite=True)
    assert read(out).command == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hard_crash_leftover_is_not_an_export(tmp_path, tiny, monkeypatch):
    # A killed process runs no cleanup: keep the temp folder, as SIGKILL would, after the
    # manifest is written but before the rename.
    monkeypatch.setattr(writer_mod, "_move_into_place", _crash)
    monkeypatch.setattr(writer_mod, "shutil", types.SimpleNamespace(rmtree=lambda *a, **k: None))
    with pytest.raises(RuntimeError):
        write(*tiny, tmp_path / "out")
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.slimlm-tmp-")
    assert (leftovers[0] / "slimlm.json").is_file()  # complete-looking, yet:
    assert _exports_in(tmp_path) == [] and not (tmp_path / "out").exists()
    with pytest.raises(SlimlmError, match="unfinished"):
        read(leftovers[0])
    monkeypatch.undo()
    read(write(*tiny, tmp_path / "out"))  # a leftover does not block the next export


def test_bad_meta_refused_before_writing(tmp_path, tiny):
    for meta, match in [({"base": "x"}, "unknown export meta key"),
                        ({"transforms": {"qaunt": 1}}, "transforms"),
                        ({"eval": [1]}, "eval"),
                        ({"config": {"p": object()}}, "JSON cannot store")]:
        with pytest.raises(SlimlmError, match=match):
            write(*tiny, tmp_path / "out", meta=meta)
    assert list(tmp_path.iterdir()) == []


def _as_if_loaded_from_gguf(model):
    qc = GgufConfig()
    model.hf_quantizer, model.is_quantized = GgufHfQuantizer(qc), True
    model.quantization_method = qc.quant_method
    model.config.quantization_config = qc
    return qc


def test_gguf_quantizer_cleared_for_saving_and_restored(tmp_path):
    model, tok = tiny_model("qwen2", seed=2)
    qc = _as_if_loaded_from_gguf(model)
    with pytest.raises(ValueError, match="not serializable"):  # why the writer must step in
        model.save_pretrained(tmp_path / "plain")
    out = write(model, tok, tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(loaded, "hf_quantizer", None) is None
    # the caller's model is as it was
    assert isinstance(model.hf_quantizer, GgufHfQuantizer) and model.is_quantized
    assert model.config.quantization_config is qc and model.quantization_method == qc.quant_method


def test_packed_gguf_weights_refused(tmp_path):
    model, tok = tiny_model("llama")
    _as_if_loaded_from_gguf(model)
    model.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}
    with pytest.raises(SlimlmError, match="dequantize"):
        write(model, tok, tmp_path / "out")
    assert model.is_quantized and list(tmp_path.iterdir()) == []


def test_other_quantization_config_left_alone(tmp_path):
    model, tok = tiny_model("llama")
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True}
    model.config.quantization_config = gptq
    out = write(model, tok, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "gptq" and saved["bits"] == 4


def test_overwrite_through_a_symlink_leaves_its_target(tmp_path, tiny):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("x")
    (tmp_path / "out").symlink_to(target)
    out = write(*tiny, tmp_path / "out", overwrite=True)
    read(out)
    assert not out.is_symlink() and (target / "precious.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
