"""An export loads back with plain transformers and behaves exactly like the model written."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.toolkit.export import FORMAT_VERSION, MANIFEST_NAME, is_export, read, sha256_file, write
from slimlm.toolkit.models import tiny_model

TEXT = "Hello, wörld! 你好 🙂\n<|im_start|>user\nsum 2+2<|im_end|>"
META = {
    "base_model": "tiny-test",
    "command": "slimlm export --model tiny --out x",
    "config": {"recipe": "none", "lr": 1e-4, "layers": [0, 1]},
    "eval": {"ppl": 12.5, "acc": 0.25},
    "transforms": {"exit_layers": [1]},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_round_trip_is_exact(tmp_path, arch):
    model, tok = tiny_model(arch, seed=3)
    out = write(model, tok, tmp_path / "export", meta=META)
    assert out == tmp_path / "export" and is_export(out)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name

    manifest = read(out)
    assert manifest.format_version == FORMAT_VERSION
    assert set(manifest.files) == {"model.safetensors", "config.json"}  # config.json decides what they compute
    entry = manifest.files["model.safetensors"]
    assert entry == {"sha256": sha256_file(out / "model.safetensors"),
                     "bytes": (out / "model.safetensors").stat().st_size}

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert type(loaded) is type(model)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tok(TEXT, return_tensors="pt")["input_ids"], ids)
    assert loaded_tok.decode(ids[0]) == TEXT
    chat = [{"role": "user", "content": "hi"}]
    assert (loaded_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_manifest_fields_round_trip(tmp_path):
    model, tok = tiny_model("llama")
    out = write(model, tok, tmp_path / "e", meta=META)
    manifest = read(out)
    assert manifest.base_model == META["base_model"]
    assert manifest.command == META["command"]
    assert manifest.config == META["config"]
    assert manifest.eval == META["eval"]
    assert manifest.transforms == {"quant": None, "pruned_shapes": None, "exit_layers": [1]}
    assert manifest.slimlm_version and manifest.created.endswith("+00:00")
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest.to_dict()


def test_defaults_without_meta(tmp_path):
    model, tok = tiny_model("qwen2")
    manifest = read(write(model, tok, tmp_path / "e"))
    assert manifest.transforms == {"quant": None, "pruned_shapes": None, "exit_layers": None}
    assert manifest.config is None and manifest.eval == {}
    assert manifest.command  # this process's command line, for provenance


def test_sharded_export_lists_every_shard_and_the_index(tmp_path):
    model, tok = tiny_model("qwen2", seed=1)
    out = write(model, tok, tmp_path / "e", max_shard_size="100KB")
    manifest = read(out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    assert set(manifest.files) == set(shards) | {"model.safetensors.index.json", "config.json"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 250]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bfloat16_stays_bfloat16(tmp_path):
    model, tok = tiny_model("llama", dtype=torch.bfloat16)
    out = write(model, tok, tmp_path / "e")
    read(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    theirs = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert theirs[name].dtype == torch.bfloat16 and torch.equal(theirs[name], tensor), name
