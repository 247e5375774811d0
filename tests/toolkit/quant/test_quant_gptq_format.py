"""GPTQ checkpoint: bit layout by hand, pack/unpack round trips, save -> load equals the fake-quant model."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import read
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant.calibrate import quantize_model
from slimlm.toolkit.quant.fake_quant import fake_quant
from slimlm.toolkit.quant.gptq_format import (dequantize_gptq, gptq_config, load_gptq, pack_qweight, pack_qzeros,
                                              read_gptq_tensors, save_gptq, unpack_qweight, unpack_qzeros)
from slimlm.toolkit.quant.scheme import QuantScheme


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ------------------------------------------------------------------ bit layout

def test_qweight_packs_inputs_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 15]])  # [out=2, in=8]
    qweight = pack_qweight(codes, bits=4)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 2)  # [in / 8, out]
    assert qweight[0, 0].item() == as_int32(0x87654321)
    assert qweight[0, 1].item() == as_int32(0xF000000F)
    codes8 = torch.tensor([[1, 2, 3, 4], [255, 0, 128, 7]])  # [out=2, in=4]
    assert pack_qweight(codes8, bits=8).tolist() == [[0x04030201, 0x078000FF]]


def test_symmetric_zero_points_are_stored_minus_one():
    # The well-known GPTQ v1 words: zero point 8 (int4) is stored as 7, 128 (int8) as 127.
    assert pack_qzeros(torch.full((8, 3), 8), bits=4).unique().tolist() == [0x77777777]
    assert pack_qzeros(torch.full((4, 2), 128), bits=8).unique().tolist() == [0x7F7F7F7F]
    qzeros = pack_qzeros(torch.tensor([[1], [2], [3], [4], [5], [6], [7], [16]]), bits=4)  # [out=8, G=1]
    assert qzeros.shape == (1, 1) and qzeros.item() == as_int32(0xF6543210)


def test_zero_point_0_is_refused():
    with pytest.raises(SlimlmError, match="zero point of 0"):
        pack_qzeros(torch.zeros(8, 1, dtype=torch.long), bits=4)


def reference_unpack(word: int, bits: int) -> list[int]:
    """Plain-integer unpack of one 32-bit word, low bits first."""
    word &= 0xFFFFFFFF
    return [(word >> (bits * j)) & ((1 << bits) - 1) for j in range(32 // bits)]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (24, 64), generator=g)  # [out, in]
    zeros = torch.randint(1, 1 << bits, (24, 2), generator=g)  # [out, G]
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits)
    assert qweight.shape == (64 * bits // 32, 24) and qzeros.shape == (2, 24 * bits // 32)
    assert torch.equal(unpack_qweight(qweight, bits), codes)
    assert torch.equal(unpack_qzeros(qzeros, bits), zeros)
    pf = 32 // bits
    for r in range(qweight.shape[0]):  # an independent reading of every word
        for o in range(24):
            assert reference_unpack(qweight[r, o].item(), bits) == codes[o, r * pf:(r + 1) * pf].tolist()


def test_dequantize_gptq_formula_by_hand():
    codes = torch.tensor([[0, 3, 15, 8, 8, 8, 8, 8]] * 8)  # [out=8, in=8]
    scales = torch.tensor([[0.5] * 8], dtype=torch.float16)  # [G=1, out]
    w = dequantize_gptq(pack_qweight(codes, 4), pack_qzeros(torch.full((8, 1), 8), 4), scales,
                        torch.zeros(8, dtype=torch.int32), bits=4)
    assert w[0].tolist() == [-4.0, -2.5, 3.5, 0, 0, 0, 0, 0]  # 0.5 * (q - 8)
    v2 = dequantize_gptq(pack_qweight(codes, 4), pack_qzeros(torch.full((8, 1), 9), 4), scales,
                         torch.zeros(8, dtype=torch.int32), bits=4, offset=0)  # gptq_v2: stored as is
    assert torch.equal(v2, w)


# ------------------------------------------------------------------ save / load

def fake_quantized(model, names, scheme):
    """The reference: each quantized weight fake-quantized (RTN), all else rounded through the scale dtype."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            module = name.rsplit(".", 1)[0]
            if module in names and name.endswith(".weight"):
                p.copy_(fake_quant(p, scheme))
            else:
                p.copy_(p.to(scheme.torch_scale_dtype).float())
    return ref


IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch, scheme", [("llama", QuantScheme(bits=4, group_size=32, sym=True)),
                                          ("qwen2", QuantScheme(bits=4, group_size=64, sym=False)),
                                          ("qwen3", QuantScheme(bits=8, group_size=-1, sym=True, scale_dtype="bf16"))])
def test_saved_checkpoint_loads_as_the_fake_quantized_model(tmp_path, arch, scheme):
    model, tok = tiny_model(arch, seed=1)
    original = copy.deepcopy(model)
    state = quantize_model(model, scheme, "rtn")
    out = save_gptq(model, tok, state, scheme, tmp_path / "q", meta={"base_model": "tiny", "command": "test"})
    manifest = read(out)  # a verified slimlm export
    assert manifest.transforms["quant"]["bits"] == scheme.bits and manifest.transforms["quant"]["format"] == "gptq"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size, "desc_act": False,
        "static_groups": False, "sym": scheme.sym, "true_sequential": True, "lm_head": False,
        "checkpoint_format": "gptq"}
    assert config["dtype"] == scheme.scale_dtype
    loaded, loaded_tok = load_gptq(out)
    ref = fake_quantized(original, set(state), scheme)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    assert loaded_tok.decode(loaded_tok("héllo")["input_ids"]) == "héllo"


def test_packed_tensors_have_the_gptq_layout(tmp_path):
    model, tok = tiny_model("qwen2", seed=2)  # q/k/v carry a bias
    scheme = QuantScheme(bits=4, group_size=32, sym=True)
    state = quantize_model(model, scheme, "rtn")
    out = save_gptq(model, tok, state, scheme, tmp_path / "q")
    layers = read_gptq_tensors(out)
    assert set(layers) == set(state)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in q.items()} == {
        "qweight": (torch.int32, (8, 64)), "qzeros": (torch.int32, (2, 8)), "scales": (torch.float16, (2, 64)),
        "g_idx": (torch.int32, (64,)), "bias": (torch.float16, (64,))}
    down = layers["model.layers.1.mlp.down_proj"]
    assert tuple(down["qweight"].shape) == (16, 64) and "bias" not in down
    assert torch.equal(down["g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    assert (down["qzeros"] == 0x77777777).all()
    files = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" not in files and files["lm_head.weight"].dtype == torch.float16
    assert gptq_config(out)["checkpoint_format"] == "gptq"


def test_act_order_gptq_round_trips_g_idx(tmp_path):
    model, tok = tiny_model("llama", seed=3)
    scheme = QuantScheme(bits=4, group_size=32, sym=False, act_order=True)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    state = quantize_model(model, scheme, "gptq", samples, progress=False)
    out = save_gptq(model, tok, state, scheme, tmp_path / "q")
    layers = read_gptq_tensors(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    assert any(not torch.equal(l["g_idx"], torch.arange(l["g_idx"].numel(), dtype=torch.int32) // 32)
               for l in layers.values())  # act-order really reordered some groups
    loaded, _ = load_gptq(out)
    for name, qw in state.items():
        assert torch.equal(layers[name]["g_idx"], qw.g_idx)
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize())  # bit-exact
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_skipped_decoder_linears_are_listed_as_dynamic_exclusions(tmp_path):
    model, tok = tiny_model("llama", seed=4)
    scheme = QuantScheme(group_size=32, skip=("lm_head", "embed", r"layers\.1\.mlp\.down_proj"))
    state = quantize_model(model, scheme, "rtn")
    out = save_gptq(model, tok, state, scheme, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    files = load_file(out / "model.safetensors")
    assert files["model.layers.1.mlp.down_proj.weight"].dtype == torch.float16
    assert "model.layers.0.mlp.down_proj.qweight" in files
    # transformers (optimum) replaces only the block linears whose names end with a listed one; vLLM reads the list
    # instead of scanning the files: the list is exactly the packed linears
    packed = {k.removesuffix(".qweight") for k in files if k.endswith(".qweight")}
    (listed,) = qc["modules_in_block_to_quantize"]
    assert set(listed) == packed and len(packed) == 13
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert {n for n in linears if any(n.endswith(x) for x in listed)} == packed
    every, _ = tiny_model("llama", seed=4)
    scheme = QuantScheme(group_size=32)
    plain = save_gptq(every, tok, quantize_model(every, scheme, "rtn"), scheme, tmp_path / "p")
    assert "modules_in_block_to_quantize" not in json.loads((plain / "config.json").read_text())["quantization_config"]


def test_a_quantized_head_is_listed_once_beside_the_block_linears(tmp_path):
    from slimlm.toolkit.quant.lm_head import quantize_lm_head

    model, tok = tiny_model("llama", seed=4, vocab_size=264)  # the head's outputs a multiple of 4 (8-bit packing)
    scheme = QuantScheme(group_size=32, skip=("lm_head", "embed", r"layers\.1\.mlp\.down_proj"))
    head = QuantScheme(bits=8, group_size=-1, sym=True, skip=())
    state = quantize_model(model, scheme, "rtn")
    state["lm_head"] = quantize_lm_head(model, head)
    out = save_gptq(model, tok, state, scheme, tmp_path / "q", lm_head_scheme=head)
    (listed,) = json.loads((out / "config.json").read_text())["quantization_config"]["modules_in_block_to_quantize"]
    assert listed.count("lm_head") == 1 and listed[-1] == "lm_head" and len(listed) == 14


def test_load_refuses_a_plain_folder(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(SlimlmError, match="not a GPTQ checkpoint"):
        load_gptq(tmp_path / "plain")


def test_a_tampered_checkpoint_is_refused(tmp_path):
    model, tok = tiny_model("llama", seed=5)
    scheme = QuantScheme(group_size=32)
    out = save_gptq(model, tok, quantize_model(model, scheme, "rtn"), scheme, tmp_path / "q")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SlimlmError, match="sha256"):
        load_gptq(out)


def test_state_that_does_not_fit_the_model_is_refused(tmp_path):
    model, tok = tiny_model("llama", seed=6)
    scheme = QuantScheme(group_size=32)
    state = quantize_model(copy.deepcopy(model), scheme, "rtn")
    state["model.layers.0.mlp.gate_proj"] = state["model.layers.0.mlp.down_proj"]
    with pytest.raises(SlimlmError, match="gate_proj has shape"):
        save_gptq(model, tok, state, scheme, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    model.model.layers[0].mlp.gate_proj = nn.Identity()
    with pytest.raises(SlimlmError, match="not a module"):
        save_gptq(model, tok, state, scheme, tmp_path / "q")


def test_models_load_routes_gptq_folders_to_load_gptq(tmp_path):
    """`slimlm eval DIR` and every other tool load a GPTQ folder through toolkit.models.load: an export
    (verified) and a plain GPTQ folder from another tool (no slimlm.json) give the dequantized model."""
    from slimlm.toolkit.models import load

    model, tok = tiny_model("llama", seed=3)
    scheme = QuantScheme(bits=4, group_size=32, sym=False)
    state = quantize_model(model, scheme, "rtn")
    out = save_gptq(model, tok, state, scheme, tmp_path / "q", meta={"base_model": "tiny", "command": "test"})
    ref, _ = load_gptq(out)
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in out.iterdir():
        if f.name != "slimlm.json":
            (plain / f.name).write_bytes(f.read_bytes())
    with torch.no_grad():
        expected = ref(IDS).logits
        for folder in (out, plain):
            loaded, _ = load(str(folder))
            torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)
    tensor_file = next(out.glob("*.safetensors"))
    tensor_file.write_bytes(tensor_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SlimlmError, match="sha256|changed|integrity"):
        load(str(out))  # an export is still verified first


def _other_tools_folder(tmp_path, name="plain", edit=None, keep_manifest=False):
    """A copy of a slimlm GPTQ export (llama, int4 g32 asymmetric): `edit(tensors, config)` changes it in place."""
    from safetensors.torch import save_file

    model, tok = tiny_model("llama", seed=3)
    scheme = QuantScheme(bits=4, group_size=32, sym=False)
    out = save_gptq(model, tok, quantize_model(model, scheme, "rtn"), scheme, tmp_path / "q", overwrite=True)
    folder = tmp_path / name
    folder.mkdir()
    for f in out.iterdir():
        if keep_manifest or f.name != "slimlm.json":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors, config = load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())
    if edit:
        edit(tensors, config, folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return out, folder


def test_a_quantize_config_json_beside_config_json_is_read_as_the_gptq_settings(tmp_path):
    """AutoGPTQ's older layout keeps the settings in quantize_config.json (often without quant_method), as many
    published checkpoints do: it loads as the same model, where before its linears were silently random."""
    from slimlm.toolkit.models import load

    def move(tensors, config, folder):
        qc = config.pop("quantization_config")
        del qc["quant_method"]
        (folder / "quantize_config.json").write_text(json.dumps(qc))

    out, folder = _other_tools_folder(tmp_path, edit=move)
    with torch.no_grad():
        torch.testing.assert_close(load(str(folder))[0](IDS).logits, load_gptq(out)[0](IDS).logits, rtol=0, atol=0)
    assert read_gptq_tensors(folder)  # the serving engine's packed path reads it too


def _without_g_idx(out, folder):
    """A copy of export `out` as another tool writes it (no manifest) and without its g_idx tensors."""
    from safetensors.torch import save_file

    folder.mkdir()
    for f in out.iterdir():
        if f.name != "slimlm.json":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def test_a_folder_without_g_idx_reads_as_consecutive_groups(tmp_path):
    """Some exports leave g_idx out where it is i // group_size (no act-order): read as that, by both readers,
    the same model as with it; the int8 head of a 4-bit checkpoint is read at its own bits."""
    from slimlm.toolkit.quant.lm_head import quantize_lm_head

    model, tok = tiny_model("llama", seed=4, vocab_size=264)
    scheme = QuantScheme(bits=4, group_size=32, sym=False)
    state = quantize_model(model, scheme, "rtn")
    head_scheme = QuantScheme(bits=8, group_size=-1, sym=True, skip=())
    state["lm_head"] = quantize_lm_head(model, head_scheme)
    out = save_gptq(model, tok, state, scheme, tmp_path / "q", lm_head_scheme=head_scheme)
    folder = _without_g_idx(out, tmp_path / "no_g_idx")
    with torch.no_grad():
        torch.testing.assert_close(load_gptq(folder)[0](IDS).logits, load_gptq(out)[0](IDS).logits, rtol=0, atol=0)
    layers, ref = read_gptq_tensors(folder), read_gptq_tensors(out)
    assert layers.keys() == ref.keys() and "lm_head" in layers
    for name in ref:
        assert torch.equal(layers[name]["g_idx"], ref[name]["g_idx"]), name
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True  # act-order: the order cannot be guessed
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimlmError, match="lacks g_idx"):
        load_gptq(folder)


def _act_order(tensors, config, folder):
    config["quantization_config"]["desc_act"] = True
    tensors.pop("model.layers.0.mlp.down_proj.g_idx")


@pytest.mark.parametrize("edit, words", [
    (_act_order, "model.layers.0.mlp.down_proj lacks g_idx, and its config says act-order"),
    (lambda t, c, f: (t.pop("model.layers.0.mlp.down_proj.g_idx"), c["quantization_config"].update(group_size=16)),
     "down_proj lacks g_idx, and its 4 groups of scales are not 128 inputs in groups of 16 (the config's group_size)"),
    (lambda t, c, f: (t.pop("model.layers.0.mlp.down_proj.g_idx"),
                      c["quantization_config"].update(dynamic={r"+:.*down_proj": {"group_size": 16}})),
     "not 128 inputs in groups of 16 (the group_size of its override in the config's dynamic) either"),
    # the same bits under another label, or 16-bit words (GPTQModel's pack_dtype): read as int32 words, garbage
    (lambda t, c, f: t.__setitem__("model.layers.0.mlp.up_proj.qweight",
                                   t["model.layers.0.mlp.up_proj.qweight"].view(torch.float32)),
     "up_proj's qweight is torch.float32; packed GPTQ codes are 32-bit integer words"),
    (lambda t, c, f: t.__setitem__("model.layers.1.mlp.up_proj.qzeros",
                                   t["model.layers.1.mlp.up_proj.qzeros"].to(torch.int16)), "qzeros is torch.int16"),
    (lambda t, c, f: c["quantization_config"].update(pack_dtype="int16"), "codes packed in int16 words"),
    (lambda t, c, f: t.__setitem__("model.layers.1.self_attn.o_proj.g_idx",
                                   t["model.layers.1.self_attn.o_proj.g_idx"] + 1), "o_proj.g_idx names groups 1..2"),
    (lambda t, c, f: t.__setitem__("model.layers.0.mlp.up_proj.scales", t["model.layers.0.mlp.up_proj.scales"][:-1]),
     "up_proj has 1 groups of scales but 2 of qzeros"),
    (lambda t, c, f: t.__setitem__("model.layers.0.self_attn.q_proj.qzeros",
                                   t["model.layers.0.self_attn.q_proj.qzeros"][:, :-1]), "q_proj has scales (2, 64) and qzeros (2, 7)"),
])
def test_a_damaged_packed_layer_is_named(tmp_path, edit, words):
    """A tensor missing or of the wrong shape, or a g_idx past the groups: an error naming the layer and tensor
    (before: KeyError, IndexError or a shape mismatch deep in the dequantization), from both readers."""
    _, folder = _other_tools_folder(tmp_path, edit=edit)
    for reader in (load_gptq, read_gptq_tensors):
        with pytest.raises(SlimlmError, match=words.replace("(", r"\(").replace(")", r"\)")):
            reader(folder)


def test_other_tools_spellings_and_layouts_load_as_the_same_model(tmp_path):
    """quant_method "GPTQ", one tensor file named after the scheme (AutoGPTQ's model_file_base_name), a layer of one
    group without g_idx under act-order, and a `dynamic` override's own group size where g_idx is left out."""
    def edit(tensors, config, folder):
        config["quantization_config"]["quant_method"] = "GPTQ"
        for key in [k for k in tensors if k.endswith(".g_idx")]:
            del tensors[key]
        config["quantization_config"]["dynamic"] = {r"+:.*\.mlp\.down_proj": {"group_size": 32}}
        config["quantization_config"]["group_size"] = 16  # wrong for every layer but the overridden down_proj
    out, folder = _other_tools_folder(tmp_path, edit=edit)
    with pytest.raises(SlimlmError, match="lacks g_idx, and its 2 groups of scales are not 64 inputs in groups of 16"):
        load_gptq(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {"-:.*q_proj": {}, "+:.*": {"group_size": 32}}  # the first match
    (folder / "config.json").write_text(json.dumps(config))                                      # decides
    with pytest.raises(SlimlmError, match="q_proj lacks g_idx"):
        load_gptq(folder)
    # act-order with static groups keeps consecutive groups: readable without g_idx
    config["quantization_config"].update(dynamic={"+:.*": {"group_size": 32}}, desc_act=True, static_groups=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_gptq(folder)[0](IDS).logits, load_gptq(out)[0](IDS).logits, rtol=0, atol=0)
    (folder / "second.safetensors").write_bytes((folder / "gptq_model-4bit-32g.safetensors").read_bytes())
    with pytest.raises(SlimlmError, match="2 .safetensors files .* but no model.safetensors.index.json"):
        load_gptq(folder)


def test_a_one_group_layer_without_g_idx_reads_in_any_order(tmp_path):
    model, tok = tiny_model("llama", seed=3)
    scheme = QuantScheme(bits=4, group_size=-1, sym=False)
    out = save_gptq(model, tok, quantize_model(model, scheme, "rtn"), scheme, tmp_path / "q")
    folder = _without_g_idx(out, tmp_path / "per_channel")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True  # one group: every order reads alike
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(load_gptq(folder)[0](IDS).logits, load_gptq(out)[0](IDS).logits, rtol=0, atol=0)


def test_an_exports_config_edited_after_export_is_refused(tmp_path):
    """An edit of config.json's quantization_config that changes how the codes are read (gptq -> gptq_v2 shifts
    every zero point by one) is refused: by config.json's hash, and where a manifest predates that hash, against
    the manifest's quant entry."""
    out, folder = _other_tools_folder(
        tmp_path, keep_manifest=True,
        edit=lambda t, c, f: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    with pytest.raises(SlimlmError, match="config.json has \\d+ bytes.*edited after export"):
        read(folder)
    with pytest.raises(SlimlmError, match="config.json"):
        load_gptq(folder)
    manifest = json.loads((folder / "slimlm.json").read_text())
    del manifest["files"]["config.json"]  # as manifests were written before config.json was hashed
    (folder / "slimlm.json").write_text(json.dumps(manifest))
    assert read(folder)  # the tensor files are untouched
    with pytest.raises(SlimlmError, match="checkpoint_format: 'gptq_v2' where the manifest says 'gptq'"):
        load_gptq(folder)
    _, plain = _other_tools_folder(tmp_path, name="other-tool",
                                   edit=lambda t, c, f: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    load_gptq(plain)  # without a manifest, the config is all there is: gptq_v2 read as such


def test_a_tied_config_with_a_quantized_head_is_refused(tmp_path):
    from slimlm.toolkit.quant.lm_head import quantize_lm_head

    model, tok = tiny_model("llama", seed=4, vocab_size=264)  # the head's outputs a multiple of 4 (8-bit packing)
    scheme = QuantScheme(bits=4, group_size=32, sym=False)
    state = quantize_model(model, scheme, "rtn")
    head_scheme = QuantScheme(bits=8, group_size=-1, sym=True, skip=())
    state["lm_head"] = quantize_lm_head(model, head_scheme)
    out = save_gptq(model, tok, state, scheme, tmp_path / "q", lm_head_scheme=head_scheme)
    assert load_gptq(out)  # as written: untied
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimlmError, match="ties the LM head to the input embeddings"):
        load_gptq(out, verify=False)  # (verified, config.json's hash refuses the edit first)


def test_older_tools_all_zero_biases_are_dropped_and_a_nonzero_one_refused(tmp_path):
    """GPTQ-for-LLaMa and early AutoGPTQ save a zero `bias` beside every packed layer of a model without biases:
    it loads as the same model (vLLM drops them too); a nonzero one, which the config cannot hold, is refused."""
    def zero_biases(tensors, config, folder):
        for key in [k for k in tensors if k.endswith(".qweight")]:
            tensors[key[:-len(".qweight")] + ".bias"] = torch.zeros(tensors[key].shape[1], dtype=torch.float16)

    out, folder = _other_tools_folder(tmp_path, edit=zero_biases)
    with torch.no_grad():
        torch.testing.assert_close(load_gptq(folder)[0](IDS).logits, load_gptq(out)[0](IDS).logits, rtol=0, atol=0)

    def one_nonzero(tensors, config, folder):
        zero_biases(tensors, config, folder)
        tensors["model.layers.0.mlp.down_proj.bias"][3] = 0.5

    _, folder = _other_tools_folder(tmp_path, name="nonzero", edit=one_nonzero)
    with pytest.raises(SlimlmError, match="model.layers.0.mlp.down_proj.bias holds a nonzero bias"):
        load_gptq(folder)


def test_marlin_and_pickled_checkpoints_are_refused_by_name(tmp_path):
    def marlin(tensors, config, folder):
        config["quantization_config"]["is_marlin_format"] = True

    _, folder = _other_tools_folder(tmp_path, edit=marlin)
    with pytest.raises(SlimlmError, match="Marlin-packed GPTQ"):
        load_gptq(folder)
    _, folder = _other_tools_folder(tmp_path, name="pickled")
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.bin")  # the name, not the content, matters
    with pytest.raises(SlimlmError, match=r"gptq_model-4bit-32g.bin \(pickle\), which slimlm does not load"):
        load_gptq(folder)
