"""Layer-by-layer calibration: true-sequential inputs, quantized outputs fed forward, RTN, refusals."""
import copy

import pytest
import torch
from torch import nn

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model
from slimlm.toolkit.quant.calibrate import default_compute_dtype, quantize_model, target_linears
from slimlm.toolkit.quant.gptq import Hessian, gptq_quantize
from slimlm.toolkit.quant.rtn import rtn_dequantize
from slimlm.toolkit.quant.scheme import QuantScheme

SCHEME = QuantScheme(bits=4, group_size=32, sym=False)


def token_samples(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def linear_inputs(model, names, ids):
    """What each named linear receives when `model` runs on `ids`, by plain forward hooks."""
    seen, handles = {}, []
    for name in names:
        hook = (lambda n: lambda mod, args: seen.__setitem__(n, args[0].detach().clone()))(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def agreement(model_inputs, original, state):
    """Per module: fraction of codes equal to GPTQ run alone on the Hessian of `model_inputs`."""
    out = {}
    for name, qw in state.items():
        h = Hessian(model_inputs[name].shape[-1])
        h.add(model_inputs[name])
        ref = gptq_quantize(original.get_submodule(name).weight, h.matrix(), SCHEME)
        out[name] = (ref.codes == qw.codes).float().mean().item()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_linear_is_quantized_on_the_inputs_of_the_already_quantized_model(arch):
    # In the finished model, every linear's inputs come from the quantized layers before it (and,
    # inside a layer, from the quantized q/k/v -> o -> gate/up stages). GPTQ run alone on exactly
    # those inputs must reproduce the codes: that checks true-sequential order and the feeding of
    # quantized outputs to the next layer, through plain HF forward passes.
    model, _ = tiny_model(arch, seed=0)
    original = copy.deepcopy(model)
    samples = token_samples(6, 48, seed=1)
    state = quantize_model(model, SCHEME, "gptq", samples, batch_tokens=96, compute_dtype=torch.float32,
                           progress=False)
    assert set(state) == set(target_linears(original, SCHEME)) and len(state) == 14
    for name, qw in state.items():  # the model now holds the dequantized weights
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
    sequential = agreement(linear_inputs(model, state, samples), original, state)
    assert min(sequential.values()) > 0.99, sequential
    # The control: inputs of the *unquantized* model must not explain the codes as well, or this
    # test could not tell the two apart.
    plain = agreement(linear_inputs(original, state, samples), original, state)
    assert plain["model.layers.1.mlp.down_proj"] < 0.97, plain
    assert sum(plain.values()) < sum(sequential.values()) - 0.1


def test_bf16_calibration_is_close_to_float32():
    model, _ = tiny_model("llama", seed=2)
    bf16_model = copy.deepcopy(model)
    samples = token_samples(8, 64, seed=3)
    quantize_model(model, SCHEME, "gptq", samples, compute_dtype=torch.float32, progress=False)
    quantize_model(bf16_model, SCHEME, "gptq", samples, compute_dtype=torch.bfloat16, progress=False)
    ids = token_samples(2, 64, seed=4)
    with torch.no_grad():
        a, b = model(ids).logits, bf16_model(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.05


def test_gptq_model_beats_rtn_model_on_held_out_tokens():
    model, _ = tiny_model("qwen2", seed=5)
    reference = copy.deepcopy(model)
    rtn = copy.deepcopy(model)
    quantize_model(model, SCHEME, "gptq", token_samples(16, 64, seed=6), progress=False)
    quantize_model(rtn, SCHEME, "rtn")
    ids = token_samples(4, 64, seed=7)
    with torch.no_grad():
        ref = reference(ids).logits
        err_gptq = (model(ids).logits - ref).norm() / ref.norm()
        err_rtn = (rtn(ids).logits - ref).norm() / ref.norm()
    assert err_gptq < 0.9 * err_rtn


def test_rtn_replaces_each_target_weight_by_its_rtn_value():
    model, _ = tiny_model("llama", seed=8)
    original = copy.deepcopy(model)
    scheme = QuantScheme(group_size=32, skip=("lm_head", "embed", r"\.mlp\."))
    state = quantize_model(model, scheme, "rtn")
    assert len(state) == 8 and not any(".mlp." in n for n in state)
    for name, module in original.named_modules():
        if isinstance(module, nn.Linear):
            got = model.get_submodule(name).weight
            want = rtn_dequantize(module.weight, scheme) if name in state else module.weight
            assert torch.equal(got, want), name


@pytest.mark.parametrize("skip, split", [
    (r"layers\.1\.self_attn\.q_proj", ["model.layers.1.self_attn.q_proj"]),
    (r"up_proj", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]),
    (r"layers\.0\.self_attn\.(q|k|v)_proj", []), (r"layers\.0\.mlp\.(gate|up)_proj", []),
    (r"down_proj", []), (r"o_proj", [])])
def test_skips_that_split_a_fused_group_are_found(skip, split):
    """vLLM, SGLang and TGI run q/k/v and gate/up as one fused layer: a checkpoint with q_proj dense beside packed
    k_proj and v_proj is refused there ("some but not all shards ... are quantized"); slimlm serves it."""
    from slimlm.toolkit.quant.calibrate import split_fused_groups

    model, _ = tiny_model("llama", seed=8)
    found = target_linears(model, QuantScheme(group_size=32, skip=("lm_head", "embed", skip)))
    assert split_fused_groups(model, found) == split


def test_stats_report_relative_output_error():
    model, _ = tiny_model("llama", seed=9)
    stats = {}
    quantize_model(model, SCHEME, "gptq", token_samples(4, 32, seed=0), progress=False, stats=stats)
    assert len(stats) == 14 and all(0 < s["rel_output_error"] < 0.5 for s in stats.values())


def test_layer_with_a_different_forward_is_refused():
    model, _ = tiny_model("llama", seed=0)
    layer = model.model.layers[1]
    plain = layer.forward
    layer.forward = lambda *args, **kwargs: plain(*args, **kwargs) * 2  # not x + attn + mlp any more
    with pytest.raises(SlimlmError, match=r"(?s)decoder layer model\.layers\.1 .*--method rtn"):
        quantize_model(model, SCHEME, "gptq", token_samples(2, 16, seed=0), progress=False)


def test_unknown_linear_in_a_layer_is_refused():
    model, _ = tiny_model("llama", seed=0)
    model.model.layers[0].mlp.extra_proj = nn.Linear(64, 64)
    with pytest.raises(SlimlmError, match="does not know: mlp.extra_proj"):
        quantize_model(model, SCHEME, "gptq", token_samples(2, 16, seed=0), progress=False)


def test_layer_sizes_that_do_not_fit_the_group_are_refused_by_name():
    model, _ = tiny_model("llama", seed=0, intermediate_size=96)
    with pytest.raises(SlimlmError, match=r"model\.layers\.0\.mlp\.down_proj has in_features=96"):
        quantize_model(model, QuantScheme(group_size=64), "rtn")


@pytest.mark.parametrize("kwargs, needle", [(dict(method="awq"), "unknown quantization method"),
                                            (dict(method="gptq"), "needs calibration samples"),
                                            (dict(method="gptq", samples=torch.ones(4)), r"token ids \[n, T\]"),
                                            (dict(method="gptq", samples=torch.full((2, 8), 10**6)),
                                             r"must lie in \[0, 259\).*got 1000000..1000000")])
def test_bad_arguments_are_refused(kwargs, needle):
    model, _ = tiny_model("llama", seed=0)
    with pytest.raises(SlimlmError, match=needle):
        quantize_model(model, SCHEME, progress=False, **kwargs)


def test_a_fast_hessian_that_is_not_positive_definite_is_rebuilt_in_float32(monkeypatch):
    from slimlm.toolkit.quant import calibrate

    class Exact(Hessian):  # never takes the bf16 shortcut
        def __init__(self, width, fast=False):
            super().__init__(width, fast=False)

    class Broken(Hessian):  # every fast Hessian comes out indefinite
        def matrix(self):
            return -super().matrix() if self.fast else super().matrix()

    samples = token_samples(4, 32, seed=11)
    runs = {}
    for name, cls in (("exact", Exact), ("broken", Broken)):
        monkeypatch.setattr(calibrate, "Hessian", cls)
        model, _ = tiny_model("llama", seed=12)
        stats = {}
        runs[name] = quantize_model(model, SCHEME, "gptq", samples, progress=False, stats=stats)
        assert {s["hessian"] for s in stats.values()} == {"float32"}
    for name, qw in runs["exact"].items():
        assert torch.equal(qw.codes, runs["broken"][name].codes), name


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(SlimlmError, match="cannot find the decoder layers"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), SCHEME, "rtn")


@pytest.mark.parametrize("compute, hessian_dtype, want", [(torch.bfloat16, None, "bf16"), (torch.bfloat16, "bf16", "bf16"),
                                                          (torch.bfloat16, "float32", "float32"),
                                                          (torch.float32, None, "float32"), (torch.float32, "bf16", "float32")])
def test_hessian_precision(compute, hessian_dtype, want, monkeypatch):
    """bf16 products only where the activations are bf16 and float32 was not asked for (fast Hessians
    that stay positive definite: the rebuild of indefinite ones is kept out by making every one definite)."""
    from slimlm.toolkit.quant import calibrate

    class Definite(Hessian):
        def matrix(self):
            return super().matrix() + torch.eye(self.sum.shape[0])

    monkeypatch.setattr(calibrate, "Hessian", Definite)
    model, _ = tiny_model("llama", seed=13)
    stats = {}
    quantize_model(model, SCHEME, "gptq", token_samples(4, 32, seed=14), progress=False,
                   stats=stats, compute_dtype=compute, hessian_dtype=hessian_dtype)
    assert len(stats) == 14 and {s["hessian"] for s in stats.values()} == {want}


def test_unknown_hessian_precision_is_refused():
    model, _ = tiny_model("llama", seed=0)
    with pytest.raises(SlimlmError, match="unknown Hessian precision 'fp16'"):
        quantize_model(model, SCHEME, "gptq", token_samples(2, 16, seed=0), progress=False, hessian_dtype="fp16")


def test_the_default_compute_dtype_is_bf16_only_where_the_hardware_multiplies_it():
    assert default_compute_dtype("cpu", {"avx2", "fma", "avx512f", "avx512_bf16"}) == torch.bfloat16
    assert default_compute_dtype("cpu", {"avx2", "amx_bf16"}) == torch.bfloat16
    assert default_compute_dtype("cpu", {"avx2", "fma", "f16c"}) == torch.float32   # AVX2 only: emulated bf16
    assert default_compute_dtype("cpu", {"avx512f", "avx512bw"}) == torch.float32   # AVX-512 without BF16
    assert default_compute_dtype("cuda", set()) == torch.bfloat16
    assert default_compute_dtype("cpu") in (torch.bfloat16, torch.float32)          # this machine's own flags
