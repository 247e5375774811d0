"""Model specs resolve to the right kind, load, and every bad input is refused clearly."""
import numpy as np
import pytest
import torch

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import load, parse_dtype, resolve, tiny_model


@pytest.fixture
def hf_dir(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_resolve_kinds(hf_dir, tmp_path):
    path, _ = hf_dir
    assert resolve("smollm2-135m").kind == "builtin"
    assert resolve(str(path)).kind == "hf_dir"
    assert resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (path / "slimlm.json").write_text("{}")
    assert resolve(str(path)).kind == "export"
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert resolve(str(g)).kind == "gguf"


def test_load_local_folder_gives_the_same_logits(hf_dir):
    path, ref = hf_dir
    model, tok = load(str(path))
    x = torch.tensor([tok("abc").input_ids])
    assert torch.equal(model(x).logits, ref(x).logits)
    bf, _ = load(str(path), dtype="bf16")
    assert bf.dtype == torch.bfloat16


@pytest.mark.parametrize("spec, words", [
    ("/no/such/model", "does not exist"),
    ("./missing-folder", "does not exist"),
    ("no-such-alias", "unknown model"),
])
def test_bad_specs(spec, words):
    with pytest.raises(SlimlmError, match=words):
        resolve(spec)


def test_a_checkpoint_missing_weights_is_refused_not_filled_with_random_ones(hf_dir):
    """transformers initializes missing weights randomly and only logs it; slimlm refuses such a folder."""
    from safetensors.torch import load_file, save_file

    path, _ = hf_dir
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimlmError, match=r"lacks 1 weight\(s\).*model.layers.1.mlp.down_proj.weight"):
        load(str(path))


@pytest.mark.parametrize("method, unread", [("awq", False), ("compressed-tensors", False), ("bitsandbytes", True)])
def test_a_method_slimlm_does_not_read_is_named(hf_dir, method, unread):
    """Before: transformers' failure about something else (a format name, a missing library, "missing weights")."""
    import json

    from safetensors.torch import load_file, save_file

    path, _ = hf_dir
    if unread:  # packed weights under other names: transformers leaves the model's own unread
        tensors = load_file(path / "model.safetensors")
        tensors["model.layers.0.mlp.down_proj.weight_packed"] = tensors.pop("model.layers.0.mlp.down_proj.weight")
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimlmError, match=f"quantized with quant_method '{method}', which slimlm does not read"):
        load(str(path))  # transformers fails on each here (a format, a library, weights it leaves unread)


def test_weights_the_config_has_no_layer_for_are_refused(hf_dir):
    """A config.json with fewer layers than the weights loaded without a word: transformers drops the rest."""
    import json

    path, model = hf_dir
    config = json.loads((path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers - 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimlmError, match=f"(?s)holds \\d+ decoder-layer weight.*layers\\.{layers - 1}\\..*"
                                          f"num_hidden_layers={layers - 1}.*config.json does not belong"):
        load(str(path))
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    assert load(str(path))[0].config.num_hidden_layers == layers
    from safetensors.torch import load_file, save_file  # older Llama checkpoints' rotary buffers: still loaded

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert load(str(path))[0].config.num_hidden_layers == layers


def test_a_device_this_torch_lacks_is_refused_before_loading(hf_dir):
    path, _ = hf_dir
    with pytest.raises(SlimlmError, match="'nodevice' is not a device torch knows"):
        load(str(path), device="nodevice")
    if not torch.cuda.is_available():
        with pytest.raises(SlimlmError, match="'cuda': this torch build has no CUDA|'cuda': no CUDA GPU is visible"):
            load(str(path), device="cuda")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SlimlmError, match="no config.json"):
        load(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(SlimlmError, match="is a file"):
        load(str(f))


def test_corrupt_safetensors(hf_dir):
    path, _ = hf_dir
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SlimlmError, match="could not load the model"):
        load(str(path))


def test_hub_unreachable_says_how_to_pass_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import; patch the constant so the test fails fast
    # instead of retrying an unreachable hub for ~25 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SlimlmError, match="local folder"):
        load("some-org/some-model-that-is-not-cached")


def test_unknown_dtype():
    with pytest.raises(SlimlmError, match="unknown dtype"):
        parse_dtype("int3")
    with pytest.raises(SlimlmError, match="not a floating-point type"):  # was blamed on corrupt weights
        parse_dtype(torch.int8)


def test_a_folder_without_tokenizer_files_says_so(hf_dir):
    path, _ = hf_dir
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    with pytest.raises(SlimlmError, match="has no tokenizer files") as err:  # was "a weight file may be corrupt"
        load(str(path))
    assert "tokenizer.save_pretrained" in err.value.hint


def _write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, "mamba")
    with pytest.raises(SlimlmError, match="'mamba' model"):
        load(str(path))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(SlimlmError, match="not a readable GGUF"):
        load(str(path))
