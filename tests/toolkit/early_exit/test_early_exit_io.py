"""Exits in an export: plain transformers loads it unchanged, exit tensors round-trip, tampering is caught;
the writer's extra-tensor hook; per-exit evaluation figures."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from slimlm.toolkit.early_exit import (EXIT_FILE, ExitHeads, exit_figures, exit_logits, load_exits, read_exit_spec,
                                       write_with_exits)
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.eval import perplexity
from slimlm.toolkit.export import read, write
from slimlm.toolkit.models import load, tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tok = tiny_model("llama", seed=5, num_hidden_layers=4)
    exits = ExitHeads.for_model(model, [1, 3], "own")
    with torch.no_grad():
        for i, head in enumerate(exits.exits.values()):
            head.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(i))
    out = write_with_exits(model, tok, exits, tmp_path_factory.mktemp("ee") / "model", meta={"eval": {"x": 1}})
    return model, exits, out


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def test_plain_transformers_loads_the_export_with_identical_logits(exported):
    model, _, out = exported
    assert (out / EXIT_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_manifest_records_the_exits_and_hashes_their_file(exported):
    _, _, out = exported
    manifest = read(out)
    assert manifest.transforms["exit_layers"] == {"layers": [1, 3], "norm": "own", "file": EXIT_FILE}
    assert EXIT_FILE in manifest.files and manifest.eval == {"x": 1}
    assert read_exit_spec(out).layers == [1, 3]


def test_exit_tensors_round_trip(exported):
    model, exits, out = exported
    assert sorted(load_file(str(out / EXIT_FILE))) == ["exits.1.norm.weight", "exits.3.norm.weight"]
    loaded_model, _ = load(str(out))
    back = load_exits(out, loaded_model)
    for key, value in exits.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    with torch.no_grad():
        a = exit_logits(model, ids(), exits)[1]
        b = exit_logits(loaded_model, ids(), back)[1]
    assert all(torch.equal(a[e], b[e]) for e in (1, 3))


def test_tampered_exit_file_is_caught(exported, tmp_path):
    import shutil

    _, _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tensors = load_file(str(copy / EXIT_FILE))
    tensors["exits.1.norm.weight"][0] += 1.0  # same size, different bytes
    save_file(tensors, str(copy / EXIT_FILE), metadata={"format": "pt"})
    with pytest.raises(SlimlmError, match="sha256"):
        read(copy)
    with pytest.raises(SlimlmError, match="sha256"):
        load_exits(copy, exported[0])


def test_shared_norm_export_has_no_exit_file(tmp_path):
    model, tok = tiny_model("llama", num_hidden_layers=2)
    out = write_with_exits(model, tok, ExitHeads.for_model(model, [1]), tmp_path / "m")
    assert not (out / EXIT_FILE).exists()
    assert read(out).transforms["exit_layers"] == {"layers": [1], "norm": "shared", "file": None}
    assert load_exits(out, model).norm_kind == "shared"
    plain = write(model, tok, tmp_path / "plain")
    assert read_exit_spec(plain) is None
    with pytest.raises(SlimlmError, match="records no early exits"):
        load_exits(plain, model)


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "exits.bin",
                                  "../x.safetensors", ".hidden.safetensors"])
def test_writer_refuses_bad_extra_names_before_writing(tmp_path, name):
    model, tok = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(SlimlmError, match="not allowed"):
        write(model, tok, tmp_path / "m", extra_tensors={name: {"a": torch.zeros(2)}})
    assert not (tmp_path / "m").exists()


def test_writer_writes_and_hashes_extra_tensors(tmp_path):
    model, tok = tiny_model("llama", num_hidden_layers=2)
    out = write(model, tok, tmp_path / "m", extra_tensors={"extra.safetensors": {"a": torch.arange(3.0)}})
    assert torch.equal(load_file(str(out / "extra.safetensors"))["a"], torch.arange(3.0))
    assert "extra.safetensors" in read(out).files
    # vLLM and SGLang load every *.safetensors of a folder without an index, and refuse tensors the model lacks:
    # an index lists the model's own file only (transformers prefers model.safetensors to it)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    weights = load_file(str(out / "model.safetensors"))
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert "model.safetensors.index.json" in read(out).files  # hashed like the weights
    again = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert not (write(model, tok, tmp_path / "plain") / "model.safetensors.index.json").exists()
    with pytest.raises(SlimlmError, match="tensor"):
        write(model, tok, tmp_path / "n", extra_tensors={"extra.safetensors": {"a": [1, 2]}})


def test_exit_figures_agree_with_perplexity_and_the_last_exit_agrees_fully():
    model, _ = tiny_model("llama", seed=2, num_hidden_layers=3)
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    exits = ExitHeads.for_model(model, [1, 3])
    r = exit_figures(model, exits, tokens, window=32, batch_size=2, max_windows=5, progress=False)
    ref = perplexity(model, tokens, window=32, batch_size=2, max_windows=5, progress=False)
    assert r["windows"] == 5 and r["tokens"] == 5 * 31
    assert r["final"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert r["exits"]["3"]["agreement"] == 1.0
    assert r["exits"]["3"]["perplexity"] == pytest.approx(r["final"]["perplexity"], rel=1e-6)
    assert 0.0 <= r["exits"]["1"]["agreement"] < 1.0
    assert math.isfinite(r["exits"]["1"]["perplexity"]) and r["exits"]["1"]["perplexity"] != r["final"]["perplexity"]
    json.dumps(r)
