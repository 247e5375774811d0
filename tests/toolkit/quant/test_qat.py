"""QAT in toolkit/quant/qat.py: the fake-quant forward is the RTN (or GPTQ) model bit for bit, the
straight-through gradient reaches the latent weights, training moves codes, convert_qat returns what the
forward used, and misuse is refused clearly."""
import copy

import pytest
import torch

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant import FakeQuantLinear, convert_qat, prepare_qat
from slimlm.toolkit.quant.calibrate import quantize_model, target_linears
from slimlm.toolkit.quant.qat import fake_quant_linears, qat_parameters
from slimlm.toolkit.quant.rtn import rtn_dequantize
from slimlm.toolkit.quant.scheme import QuantScheme

SCHEME = QuantScheme(bits=4, group_size=32, sym=False)
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def samples():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("grid", ["dynamic", "frozen"])
@pytest.mark.parametrize("scheme", [SCHEME, QuantScheme(bits=4, group_size=-1, sym=True),
                                    QuantScheme(bits=8, group_size=64, sym=False, scale_dtype="bf16")],
                         ids=["int4-g32-asym", "int4-perchannel-sym", "int8-g64-asym-bf16"])
def test_forward_equals_the_rtn_model_bit_for_bit(grid, scheme):
    model, _ = tiny_model("qwen2", seed=0, initializer_range=0.3)  # qwen2: q/k/v have a bias
    rtn = copy.deepcopy(model)
    quantize_model(rtn, scheme, "rtn", progress=False)
    originals = {n: m.weight.detach().clone() for n, m in target_linears(model, scheme).items()}
    wrapped = prepare_qat(model, scheme, grid=grid)
    assert set(wrapped) == set(originals) and len(wrapped) == 14
    assert not isinstance(model.lm_head, FakeQuantLinear)  # skipped by default, as are the embeddings
    for name, fq in wrapped.items():
        assert torch.equal(fq.weight, originals[name])  # the latent weight is the model's own
        assert torch.equal(fq.fake_weight(), rtn_dequantize(originals[name], scheme))
    assert torch.equal(logits(model), logits(rtn))
    assert not torch.equal(logits(rtn), logits(tiny_model("qwen2", seed=0, initializer_range=0.3)[0]))


def test_straight_through_gradient_is_the_gradient_at_the_quantized_weights():
    model, _ = tiny_model("llama", seed=1)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, SCHEME, "rtn", progress=False)
    prepare_qat(model, SCHEME)
    params = qat_parameters(model, "quantized")
    assert len(params) == 14 and not model.model.embed_tokens.weight.requires_grad
    for m in (model, rtn):
        m(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    for name, fq in fake_quant_linears(model).items():
        grad = fq.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        # STE: d loss / d latent == d loss / d (quantized weight), which the RTN model computes directly
        torch.testing.assert_close(grad, rtn.get_submodule(name).weight.grad, rtol=1e-5, atol=1e-7)
    assert model.model.embed_tokens.weight.grad is None


def test_training_lowers_the_loss_and_convert_returns_the_codes_the_forward_used():
    model, _ = tiny_model("llama", seed=2, initializer_range=0.3)
    prepare_qat(model, SCHEME)
    start = {n: fq.quantize() for n, fq in fake_quant_linears(model).items()}
    opt = torch.optim.Adam(qat_parameters(model), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    trained = logits(model)
    state = convert_qat(model)
    assert not fake_quant_linears(model) and isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    changed = sum((state[n].codes != start[n].codes).sum().item() for n in state)
    assert changed > 100  # the codes moved, not only the latent weights
    for name, qw in state.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
    assert torch.equal(logits(model), trained)  # the converted model is the fake-quant model


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_start_is_the_gptq_model_on_a_frozen_grid(act_order):
    scheme = QuantScheme(bits=4, group_size=32, sym=True, act_order=act_order)
    model, _ = tiny_model("llama", seed=3, initializer_range=0.3)
    gptq = copy.deepcopy(model)
    ref = quantize_model(gptq, scheme, "gptq", samples(), progress=False)
    wrapped = prepare_qat(model, scheme, init="gptq", samples=samples())
    assert all(fq.frozen for fq in wrapped.values())
    assert torch.equal(logits(model), logits(gptq))
    if act_order:  # g_idx is not i // group_size: the frozen grid keeps GPTQ's column groups
        assert any(not torch.equal(qw.g_idx.long(), torch.arange(qw.shape[1]) // 32) for qw in ref.values())
    state = convert_qat(model)
    for name, qw in ref.items():
        got = state[name]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.scales, qw.scales)
        assert torch.equal(got.zeros, qw.zeros) and torch.equal(got.g_idx, qw.g_idx)


def test_frozen_grid_clamps_weights_that_leave_it():
    model, _ = tiny_model("llama", seed=4)
    fq = prepare_qat(model, SCHEME, grid="frozen")["model.layers.0.mlp.down_proj"]
    hi = (fq.qat_scales * (SCHEME.maxq - fq.qat_zeros)).max()
    with torch.no_grad():
        fq.weight.mul_(100.0)
    assert fq.fake_weight().max() <= hi + 1e-6
    assert fq.quantize().codes.max() == SCHEME.maxq


def test_misuse_is_refused_clearly():
    model, _ = tiny_model("llama", seed=5)
    with pytest.raises(SlimlmError, match="unknown QAT init"):
        prepare_qat(model, SCHEME, init="awq")
    with pytest.raises(SlimlmError, match="unknown QAT grid"):
        prepare_qat(model, SCHEME, grid="learned")
    with pytest.raises(SlimlmError, match="re-round GPTQ"):
        prepare_qat(model, SCHEME, init="gptq", grid="dynamic", samples=samples())
    with pytest.raises(SlimlmError, match="calibration samples"):
        prepare_qat(model, SCHEME, init="gptq")
    with pytest.raises(SlimlmError, match="act_order is a GPTQ option"):
        prepare_qat(model, QuantScheme(bits=4, group_size=32, act_order=True))
    with pytest.raises(SlimlmError, match="no FakeQuantLinear"):
        convert_qat(model)
    with pytest.raises(SlimlmError, match="not divisible by the group size") as refusal:
        prepare_qat(tiny_model("llama", seed=5, intermediate_size=96)[0], QuantScheme(bits=4, group_size=64))
    assert "Choose a group size that divides it (32), use --group-size -1" in refusal.value.hint  # only 32 divides 96
    assert not fake_quant_linears(model)  # nothing was wrapped by the refused calls
    prepare_qat(model, SCHEME)
    with pytest.raises(SlimlmError, match="already prepared"):
        prepare_qat(model, SCHEME)
    with pytest.raises(SlimlmError, match="unknown QAT train"):
        qat_parameters(model, "norms")
