"""QAT checked in the kernel it will run on: a model trained through fake-quant weights, converted and
written by `save_gptq`, loads through slimlm's loader and is served by the engine's packed int4/int8
kernels (QuantLinear) with the fake-quant model's logits.

Tolerance (fp32 activations): |served - fake-quant| <= 2e-4 * max|logit|, at every prefill position and
every decode step. Both run the same weights: the test keeps the tensors that are not quantized
(embeddings, norms) on the float16 grid `save_gptq` stores them in, and QAT trains only the quantized
linears. What is left is the kernel's float32 summation order: measured here 2.2e-5 (int4 g32),
0.9e-5 (int4 g64, GPTQ start) and 6.2e-5 (int8 per channel) of the largest logit. One wrong code, scale
or zero point moves logits by more than 1e-2; the untrained RTN model is 0.6-1.6 away (checked below).
"""
import copy
import random

import pytest
import torch

from slimlm.serve.layers import AttentionMetadata
from slimlm.serve.layers.quant_linear import QuantLinear
from slimlm.serve.llm import LLM
from slimlm.serve.models import load_model
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.export import read
from slimlm.toolkit.models import load, tiny_model
from slimlm.toolkit.quant import convert_qat, prepare_qat
from slimlm.toolkit.quant.gptq_format import save_gptq
from slimlm.toolkit.quant.qat import fake_quant_linears, qat_parameters
from slimlm.toolkit.quant.scheme import QuantScheme

TOL = 2e-4  # of the largest logit; see the module doc
BLOCK = 4
PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [200, 1, 2], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]]
PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_qat_model(arch, scheme, init="rtn", steps=6):
    # A GPTQ start sits exactly on its (frozen) grid, half a step from the next code, while RTN's
    # latent weights lie anywhere in their cells: the GPTQ case needs a larger rate to move codes.
    """A tiny model after a few QAT steps (codes moved), non-quantized tensors on the float16 grid."""
    model, tok = tiny_model(arch, seed=0, initializer_range=0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(scheme.torch_scale_dtype).float())
    samples = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    prepare_qat(model, scheme, init=init, samples=samples if init == "gptq" else None)
    start = {n: fq.quantize().codes for n, fq in fake_quant_linears(model).items()}
    opt = torch.optim.Adam(qat_parameters(model, "quantized"), lr=3e-3 if init == "rtn" else 3e-2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    moved = sum((fq.quantize().codes != start[n]).sum().item() for n, fq in fake_quant_linears(model).items())
    assert moved > 50, moved
    return model.eval(), tok


def hf_last_logits(model, seqs):
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0, -1:] for s in seqs])


def engine_steps(model, hf_reference, steps=4):
    """Prefill PROMPTS in one step (checking every position), then decode them together with greedy
    tokens; returns the largest |served - reference| / max|reference| over all logits compared."""
    cache = model.allocate_kv_cache(64, BLOCK)
    free = list(range(64))
    random.Random(0).shuffle(free)
    seqs, cached, tables = [list(p) for p in PROMPTS], [0] * len(PROMPTS), [[] for _ in PROMPTS]
    worst = 0.0
    for step in range(steps):
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
            hidden = model(torch.tensor(ids), torch.tensor(pos), cache, meta)  # [tokens, D]
            if step == 0:  # every prefill position against the HF model's full forward
                got = model.compute_logits(hidden).float()
                ref = torch.cat([hf_reference(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs])
            else:
                got = model.compute_logits(hidden[meta.last_token_indices]).float()
                ref = hf_last_logits(hf_reference, seqs)
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        for i, t in enumerate(got[meta.last_token_indices if step == 0 else slice(None)].argmax(-1).tolist()):
            cached[i] = len(seqs[i])
            seqs[i].append(t)
    return worst


CASES = [("llama", QuantScheme(bits=4, group_size=32, sym=False), "rtn"),
         ("llama", QuantScheme(bits=4, group_size=64, sym=True), "gptq"),
         ("qwen2", QuantScheme(bits=8, group_size=-1, sym=False), "rtn")]


@pytest.mark.parametrize("arch, scheme, init", CASES,
                         ids=[f"{a}-int{s.bits}-g{s.group_size}-{i}" for a, s, i in CASES])
def test_exported_qat_model_served_by_the_engine_gives_the_fake_quant_logits(tmp_path, arch, scheme, init):
    model, tok = trained_qat_model(arch, scheme, init)
    reference = model  # the fake-quant model itself, FakeQuantLinear layers in place
    before = tiny_model(arch, seed=0, initializer_range=0.3)[0]
    prepare_qat(before, scheme)  # the untrained RTN model: must be far outside the tolerance

    converted = copy.deepcopy(model)  # convert a copy: the reference keeps its FakeQuantLinears
    state = convert_qat(converted)
    folder = save_gptq(converted, tok, state, scheme, tmp_path / "qat", meta={"transforms": {"quant": {"method": "qat"}}})
    assert read(folder).transforms["quant"]["method"] == "qat"

    hf, _ = load(str(folder))  # slimlm's own loader: verifies the manifest, dequantizes the packed codes
    served = load_model(hf)
    layers = [getattr(layer, name) for layer in served.layers for name in PROJ]
    assert all(isinstance(lin, QuantLinear) and lin.bits == scheme.bits for lin in layers)

    worst = engine_steps(served, reference)
    assert worst <= TOL, worst
    assert engine_steps(load_model(hf), before) > 50 * TOL  # the check can tell trained from untrained

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = LLM(hf, tok, num_blocks=64).generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):  # greedy tokens of the engine == the fake-quant model's
        seq = list(prompt)
        for _ in range(8):
            seq.append(int(hf_last_logits(reference, [seq]).argmax()))
        assert out.outputs[0].token_ids == seq[len(prompt):]
