"""Serving a GPTQ folder: the engine's projections are QuantLinears built from the packed codes, and
its logits and greedy tokens equal the engine on the same model's dense dequantized weights."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.layers.quant_linear import QuantLinear
from slimlm.serve.llm import LLM
from slimlm.serve.models import load_model
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import load, tiny_model
from slimlm.toolkit.quant.calibrate import quantize_model
from slimlm.toolkit.quant.gptq_format import GPTQ_DIR_ATTR, load_gptq, pack_last, save_gptq, unpack_qzeros
from slimlm.toolkit.quant.lm_head import head_scheme, quantize_lm_head
from slimlm.toolkit.quant.scheme import QuantScheme

torch.set_num_threads(1)
INIT = 0.3  # logits spread over a few units: greedy text varies and a wrong weight shows
BLOCK = 4
PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [200, 1, 2], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]]


def quantized_dir(tmp_path, arch, scheme, method="rtn", seed=0, **overrides):
    model, tok = tiny_model(arch, seed=seed, initializer_range=INIT, **overrides)
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    state = quantize_model(model, scheme, method, samples if method == "gptq" else None, progress=False)
    return save_gptq(model, tok, state, scheme, tmp_path / "q")


def dense_twin(hf):
    """The same HF model, served from its dequantized weights (no GPTQ folder recorded)."""
    folder = getattr(hf, GPTQ_DIR_ATTR)
    delattr(hf, GPTQ_DIR_ATTR)
    try:
        return load_model(hf)
    finally:
        setattr(hf, GPTQ_DIR_ATTR, folder)


def quant_layers(model):
    return [getattr(layer, name) for layer in model.layers for name in PROJ]


def step_logits(models, steps=4, prompts=None):
    """Prefill `prompts` (default PROMPTS) in one step, then decode them together (tokens: the first
    model's argmax). Returns per model the logits of every step: [prefill rows, decode rows...]."""
    prompts = PROMPTS if prompts is None else prompts
    caches = [m.allocate_kv_cache(64, BLOCK) for m in models]
    free = list(range(64))
    random.Random(0).shuffle(free)
    tables = [[] for _ in prompts]
    seqs, cached = [list(p) for p in prompts], [0] * len(prompts)
    out = [[] for _ in models]
    for _ in range(steps):
        ids, pos, q_lens, s_lens = [], [], [], []
        for i, s in enumerate(seqs):
            ids += s[cached[i]:]
            pos += range(cached[i], len(s))
            q_lens.append(len(s) - cached[i])
            s_lens.append(len(s))
            while len(tables[i]) * BLOCK < len(s):
                tables[i].append(free.pop())
        meta = AttentionMetadata.build(q_lens, s_lens, tables, BLOCK)
        with torch.no_grad():
            for j, (m, c) in enumerate(zip(models, caches)):
                hidden = m(torch.tensor(ids), torch.tensor(pos), c, meta)[meta.last_token_indices]
                out[j].append(m.compute_logits(hidden).float())
        for i, t in enumerate(out[0][-1].argmax(-1).tolist()):
            cached[i] = len(seqs[i])
            seqs[i].append(t)
    return out


def assert_fp32_close(quant_steps, dense_steps):
    """fp32: the kernel's products are exact, but it sums x * code in float32 and subtracts zero * sum(x)
    after (per group), so cancellation costs a few float32 steps: measured <= 7e-5 of the largest logit
    (int8 per channel), 1e-5 for int4 g32. A wrong code, scale, zero or part order moves logits by > 1e-2."""
    for q, d in zip(quant_steps, dense_steps):
        assert (q - d).abs().max() <= 2e-4 * d.abs().max(), float((q - d).abs().max() / d.abs().max())


SCHEMES = [("llama", QuantScheme(bits=4, group_size=32, sym=True)),
           ("llama", QuantScheme(bits=4, group_size=64, sym=False)),
           ("llama", QuantScheme(bits=8, group_size=-1, sym=False)),
           ("qwen2", QuantScheme(bits=4, group_size=-1, sym=True)),  # q/k/v bias
           ("qwen2", QuantScheme(bits=8, group_size=32, sym=True, scale_dtype="bf16")),
           ("qwen3", QuantScheme(bits=4, group_size=32, sym=False))]


@pytest.mark.parametrize("arch, scheme", SCHEMES,
                         ids=[f"{a}-int{s.bits}-g{s.group_size}-{'sym' if s.sym else 'asym'}" for a, s in SCHEMES])
def test_engine_runs_the_packed_codes_and_matches_dense(tmp_path, arch, scheme):
    folder = quantized_dir(tmp_path, arch, scheme)
    hf, _ = load(str(folder))
    model, dense = load_model(hf), dense_twin(hf)
    layers = quant_layers(model)
    assert all(isinstance(lin, QuantLinear) for lin in layers), [type(lin).__name__ for lin in layers]
    assert {(lin.bits, lin.act_dtype) for lin in layers} == {(scheme.bits, torch.float32)}
    gs = 64 if scheme.group_size == -1 else scheme.group_size  # tiny hidden size 64: per channel = 64 inputs
    assert layers[0].group_size == gs and layers[3].group_size == (128 if scheme.group_size == -1 else gs)
    assert (layers[0].bias is not None) == (arch == "qwen2")
    assert not isinstance(model.lm_head, QuantLinear)  # lm_head is not quantized by default
    assert model.gptq.dense == ({} if arch == "llama" else {"lm_head": "not quantized in the checkpoint"})  # tied
    for lin in layers:  # every packed projection stands for exactly the dense model's weight
        w = lin.dequantize()
        ref = [d for d in quant_layers(dense) if tuple(d.weight.shape) == tuple(w.shape)]
        assert any(torch.equal(w, r.weight) for r in ref)
    assert_fp32_close(*step_logits([model, dense]))


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_is_as_close_to_fp32_as_the_dense_bf16_engine(tmp_path, bits):
    # bf16 activations. Decode takes the exact kernel (bf16 x times exact codes); the dense bf16 engine
    # multiplies bf16-rounded weights: different roundings, the same size of error against fp32. Prefill
    # of 123 rows takes the GEMM path (each block dequantized to bf16, like the dense weights): ~equal.
    folder = quantized_dir(tmp_path, "llama", QuantScheme(bits=bits, group_size=64, sym=False))
    hf, _ = load(str(folder), dtype="bf16")
    quant, dense = load_model(hf), dense_twin(hf)
    assert all(isinstance(lin, QuantLinear) and lin.act_dtype == torch.bfloat16 for lin in quant_layers(quant))
    ref = dense_twin(load(str(folder))[0])  # fp32
    PROMPTS.append(list(range(100)))
    try:
        ref_steps, quant_steps, dense_steps = step_logits([ref, quant, dense], steps=3)
    finally:
        PROMPTS.pop()
    torch.testing.assert_close(quant_steps[0], dense_steps[0], rtol=0, atol=1e-2)
    for r, q, d in zip(ref_steps, quant_steps, dense_steps):
        q_err, d_err = (q - r).abs(), (d - r).abs()  # measured: mean 0.03-0.09, max <= 0.07 of the largest logit
        assert q_err.mean() <= 1.5 * d_err.mean() + 1e-3 and q_err.max() <= 0.15 * r.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generation_equals_the_dense_engine(tmp_path, arch):
    folder = quantized_dir(tmp_path, arch, QuantScheme(bits=4, group_size=32, sym=False), seed=3)
    hf, tok = load(str(folder))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quant = LLM(hf, tok, num_blocks=64)
    assert isinstance(quant.engine.model.layers[0].qkv_proj, QuantLinear)
    delattr(hf, GPTQ_DIR_ATTR)
    dense = LLM(hf, tok, num_blocks=64)
    assert not isinstance(dense.engine.model.layers[0].qkv_proj, QuantLinear)
    q_out, d_out = quant.generate(PROMPTS, params), dense.generate(PROMPTS, params)
    q_tokens = [o.outputs[0].token_ids for o in q_out]
    assert q_tokens == [o.outputs[0].token_ids for o in d_out]
    assert len({tuple(t) for t in q_tokens}) > 1 and all(len(t) == 12 for t in q_tokens)


def to_gptq_v2(folder, out):
    """Rewrite a v1 checkpoint as gptq_v2 (zero points stored as they are)."""
    out.mkdir()
    tensors = load_file(folder / "model.safetensors")
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    for key in [k for k in tensors if k.endswith(".qzeros")]:
        tensors[key] = pack_last(unpack_qzeros(tensors[key], bits).T, bits)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (out / "config.json").write_text(json.dumps(config))
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_gptq_v2_zero_points_serve_the_same_model(tmp_path):
    folder = quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=32, sym=False))
    v1, _ = load(str(folder))
    v2, _ = load_gptq(to_gptq_v2(folder, tmp_path / "v2"))
    m1, m2 = load_model(v1), load_model(v2)
    assert all(isinstance(lin, QuantLinear) for lin in quant_layers(m2))
    for a, b in zip(quant_layers(m1), quant_layers(m2)):
        assert torch.equal(a.dequantize(), b.dequantize())


def test_static_groups_act_order_serves_quantized(tmp_path):
    scheme = QuantScheme(bits=4, group_size=32, sym=True, act_order=True, static_groups=True)
    hf, _ = load(str(quantized_dir(tmp_path, "llama", scheme, method="gptq")))
    assert all(isinstance(lin, QuantLinear) for lin in quant_layers(load_model(hf)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_order_with_scattered_groups_serves_quantized(tmp_path, dtype):
    # desc_act without static groups: g_idx scatters the groups; the layers hold the codes sorted by
    # group and gather x in that order, except down_proj, whose order moves onto gate|up's rows. fp32:
    # the dense model's logits; bf16: the fused decode stack (which calls the same kernel entry) gives
    # the layer path's logits bit for bit.
    from slimlm.serve.models import cpu_decode

    scheme = QuantScheme(bits=4, group_size=32, sym=False, act_order=True)
    folder = quantized_dir(tmp_path, "llama", scheme, method="gptq", **STACK_SHAPES)
    g_idx = load_file(str(folder / "model.safetensors"))["model.layers.0.self_attn.q_proj.g_idx"]
    assert not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 32)  # really scattered
    hf, _ = load(str(folder), dtype=dtype)
    model = load_model(hf)
    layers = quant_layers(model)
    assert all(isinstance(lin, QuantLinear) for lin in layers) and model.gptq.dense == {}
    for layer, ref in zip(model.layers, dense_twin(hf).layers):
        for name in ("qkv_proj", "o_proj"):  # in input order, the model's weight
            assert getattr(layer, name).perm is not None
            assert torch.equal(getattr(layer, name).dequantize().to(dtype), getattr(ref, name).weight)
        assert layer.gate_up_proj.perm is not None and layer.down_proj.perm is None  # down's order absorbed
        # the same rows as the model's gate|up, in another order
        got, want = layer.gate_up_proj.dequantize().to(dtype), ref.gate_up_proj.weight
        assert not torch.equal(got, want)
        assert torch.equal(torch.sort(got, dim=0).values, torch.sort(want, dim=0).values)
    if dtype == torch.float32:
        assert_fp32_close(*step_logits([model, dense_twin(hf)], steps=3))
        return
    layered = load_model(hf)
    layered._stack = None
    if cpu_decode.decode_stack_for(model) is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    model._stack = cpu_decode.decode_stack_for(model)
    for a, b in zip(*step_logits([model, layered], steps=4)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_act_order_groups_of_unequal_size_run_dense_with_one_warning(tmp_path):
    # A g_idx whose groups are not all group_size long has no consecutive layout: that layer stays dense.
    scheme = QuantScheme(bits=4, group_size=32, sym=False, act_order=True)
    folder = quantized_dir(tmp_path, "llama", scheme, method="gptq")
    out = tmp_path / "other"  # as another tool would write it: no slimlm manifest
    out.mkdir()
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.g_idx"
    g_idx = tensors[key].clone()
    g_idx[g_idx == 0] = 1  # group 0 empty, group 1 twice its size: no longer a regrouping of equal groups
    tensors[key] = g_idx
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    hf, _ = load_gptq(out)
    with pytest.warns(UserWarning, match="groups of one size") as record:
        model = load_model(hf)
    assert sum("run dense" in str(w.message) for w in record) == 1
    assert list(model.gptq.dense) == ["model.layers.1.mlp.down_proj"], model.gptq.dense
    assert "groups of 0 and 32 and 64 inputs (g_idx)" in model.gptq.dense["model.layers.1.mlp.down_proj"]
    assert not isinstance(model.layers[1].down_proj, QuantLinear)
    assert isinstance(model.layers[0].down_proj, QuantLinear)


def test_skipped_layers_stay_dense_and_the_rest_quantized(tmp_path):
    scheme = QuantScheme(bits=8, group_size=32, skip=("lm_head", "embed", "layers.1.self_attn.k_proj", "down_proj"))
    hf, _ = load(str(quantized_dir(tmp_path, "llama", scheme)))
    model = load_model(hf)
    kinds = [[type(getattr(layer, n)).__name__ for n in PROJ] for layer in model.layers]
    assert kinds[0][:3] == ["QuantLinear"] * 3 and kinds[0][3] != "QuantLinear"
    assert not isinstance(model.layers[1].qkv_proj, QuantLinear)  # k_proj skipped: the fused q|k|v is dense
    assert isinstance(model.layers[1].gate_up_proj, QuantLinear)
    assert not any(isinstance(layer.down_proj, QuantLinear) for layer in model.layers)
    assert_fp32_close(*step_logits([model, dense_twin(hf)], steps=2))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_lm_head_is_served_from_its_codes(tmp_path, kind):
    # `slimlm quantize --quantize-lm-head`: the tied head untied and packed at its own bits; the engine
    # serves it as a QuantLinear (the embedding stays dense) and gives the dequantized model's logits.
    model, tok = tiny_model("llama", seed=2, initializer_range=INIT, vocab_size=264)
    body = QuantScheme(bits=4, group_size=32, sym=False)
    head = head_scheme(body, kind)
    state = quantize_model(model, body, "rtn", progress=False)
    state["lm_head"] = quantize_lm_head(model, head)
    hf, _ = load(str(save_gptq(model, tok, state, body, tmp_path / "q", lm_head_scheme=head)))
    served, dense = load_model(hf), dense_twin(hf)
    assert isinstance(served.lm_head, QuantLinear) and served.lm_head.bits == head.bits
    assert not isinstance(dense.lm_head, QuantLinear) and served.gptq.dense == {}
    assert torch.equal(served.lm_head.dequantize(), dense.lm_head.weight)
    assert torch.equal(served.embed_tokens, hf.model.embed_tokens.weight)  # dense, not the quantized head
    assert_fp32_close(*step_logits([served, dense], steps=3))


def test_a_model_changed_after_loading_serves_its_own_weights(tmp_path):
    hf, _ = load(str(quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=32))))
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    with pytest.warns(UserWarning, match="changed after loading"):
        model = load_model(hf)
    assert not isinstance(model.layers[0].down_proj, QuantLinear)
    assert isinstance(model.layers[1].down_proj, QuantLinear)
    torch.testing.assert_close(model.layers[0].down_proj(torch.eye(128)).T, hf.model.layers[0].mlp.down_proj.weight)


def test_quantized_weights_off_and_unreadable_folders_serve_dense(tmp_path):
    hf, _ = load(str(quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=32))))
    assert not any(isinstance(lin, QuantLinear) for lin in quant_layers(load_model(hf, quantized_weights=False)))
    setattr(hf, GPTQ_DIR_ATTR, str(tmp_path / "gone"))
    with pytest.warns(UserWarning, match="dequantized weights instead"):
        model = load_model(hf)
    assert model.gptq is None and not any(isinstance(lin, QuantLinear) for lin in quant_layers(model))


def test_fp16_serving_keeps_dense_weights_with_a_warning(tmp_path):
    hf, _ = load(str(quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=32))))
    with pytest.warns(UserWarning, match="bfloat16 or float32"):
        model = load_model(hf, dtype=torch.float16)
    assert not any(isinstance(lin, QuantLinear) for lin in quant_layers(model))


def test_slimlm_bench_runs_on_a_gptq_folder(tmp_path, monkeypatch, capsys):
    from slimlm.recipes.cli import main
    from slimlm.serve import bench

    folder = quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=64))
    seen = []
    real = bench.benchmark
    monkeypatch.setattr(bench, "benchmark", lambda engine, *a, **k: (seen.append(engine), real(engine, *a, **k))[1])
    code = main(["bench", str(folder), "--batch-sizes", "1", "--concurrency", "0", "--prompt-len", "8",
                 "--gen-len", "3", "--reps", "1", "--json", str(tmp_path / "b.json")])
    assert code == 0
    assert isinstance(seen[0].model.layers[0].gate_up_proj, QuantLinear)
    assert seen[0].model.layers[0].gate_up_proj.act_dtype == torch.bfloat16  # bench defaults to bf16
    assert json.loads((tmp_path / "b.json").read_text())["rows"]["engine batch 1"]["tokens_per_s"]["median"] > 0


STACK_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
STACK_CASES = [("llama", 4, torch.float32, 1), ("llama", 4, torch.bfloat16, 3), ("qwen2", 8, torch.float32, 3),
               ("qwen2", 4, torch.bfloat16, 1), ("llama", 8, torch.bfloat16, 3), ("llama", 4, torch.bfloat16, 6)]


@pytest.mark.parametrize("arch, bits, dtype, batch", STACK_CASES,
                         ids=[f"{a}-int{b}-{str(d)[6:]}-batch{n}" for a, b, d, n in STACK_CASES])
def test_fused_decode_stack_runs_quantized_layers_as_the_layer_path_does(tmp_path, monkeypatch, arch, bits, dtype,
                                                                         batch):
    # The stack calls the QuantLinears' own kernel with their own arguments: bit for bit the layer path,
    # also past GEMV_MAX_ROWS (batch 6), where a model of quantized layers still runs in the stack.
    from slimlm.serve.models import cpu_decode

    folder = quantized_dir(tmp_path, arch, QuantScheme(bits=bits, group_size=32, sym=False), **STACK_SHAPES)
    hf, _ = load(str(folder), dtype=dtype)
    fused, layered = load_model(hf), load_model(hf)
    assert all(isinstance(lin, QuantLinear) for lin in quant_layers(fused))
    if cpu_decode.decode_stack_for(dense_twin(hf)) is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    fused._stack = cpu_decode.decode_stack_for(fused)
    assert fused._stack is not None
    layered._stack = None
    prompts = (PROMPTS * 2)[:batch]
    calls = []
    real = cpu_decode.DecodeStack.__call__
    monkeypatch.setattr(cpu_decode.DecodeStack, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    stack_steps, layer_steps = step_logits([fused, layered], steps=5, prompts=prompts)
    assert len(calls) == 4  # every decode step after the prefill
    for a, b in zip(stack_steps, layer_steps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if dtype == torch.float32:
        assert_fp32_close(stack_steps, step_logits([dense_twin(hf)], steps=5, prompts=prompts)[0])


def test_fused_decode_stack_refuses_a_layer_it_cannot_run(tmp_path):
    # A QuantLinear without the C kernel (or in another dtype) sends the model back to the layer path.
    from slimlm.serve.models import cpu_decode

    hf, _ = load(str(quantized_dir(tmp_path, "llama", QuantScheme(bits=4, group_size=32), **STACK_SHAPES)))
    model, dense = load_model(hf), dense_twin(hf)
    if cpu_decode.decode_stack_for(dense) is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    o = model.layers[1].o_proj
    model.layers[1].o_proj = QuantLinear(o.packed, o.bias, o.act_dtype, use_kernel=False)
    assert cpu_decode.decode_stack_for(model) is None
    assert_fp32_close(*step_logits([model, dense], steps=4))
    assert model._stack is None and dense._stack is not None  # the dense twin decodes through the stack
