"""QuantLinear: every path (exact kernel, dequantize-then-GEMM, PyTorch fallback) against x @ dequantize().T.

Tolerances (S = |x| @ |W|.T + |bias|; see tests/serve/kernels/test_quant_cpu.py for the derivation):
exact kernel 2e-5 S (float32 sums) plus 2^-8 |ref| for a bf16 output; dequantize-then-GEMM (bf16, from
gemm_min_rows(bits) rows) 2^-9 S more (each weight rounded to bf16 once); the float32 PyTorch fallback 1e-5 S.
"""
import pytest
import torch

from slimlm.serve.kernels.quant_cpu import dequantize_rows, qgemv_library, reference_qmatmul
from slimlm.serve.layers.quant_linear import QuantLinear, gemm_min_rows

CASES = [(128, 128, 64), (100, 96, 32), (70, 160, 160), (192, 256, 128), (130, 75, 75)]
ROWS = [1, 2, 3, 4, 5, 16, 33]


@pytest.fixture
def one_thread():
    # The grid's tensors are small: with two threads, every op of it waits whenever a neighbour holds a
    # core (seconds per test on a busy shared machine). Threads are covered by test_quant_cpu.py.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_quant(out_f, in_f, gs, bits, seed):
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // gs, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, maxq + 1, (out_f, in_f // gs), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


def assert_close_to_reference(y, x, codes, scales, zeros, gs, bias, rel_s, rel_ref):
    ref = reference_qmatmul(x, codes, scales, zeros, gs, bias)
    size = x.double().abs() @ dequantize_rows(codes, scales, zeros, gs).double().abs().t()
    if bias is not None:
        size = size + bias.double().abs()
    err = (y.double() - ref).abs()
    assert bool((err <= rel_s * size + rel_ref * ref.abs() + 1e-30).all()), f"max err {err.max().item():.3g}"


def rel_size(layer, m):
    """The path's tolerance relative to S (module doc) for a call with m rows."""
    if not layer.uses_kernel:
        return 1e-5
    if layer.act_dtype == torch.bfloat16 and m >= gemm_min_rows(layer.bits):
        return 2 ** -9 * 1.01 + 2e-5
    return 2e-5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_quant_linear_matches_dequantized_matmul(bits, case, act, bias, kernel, one_thread):
    out_f, in_f, gs = case
    codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=out_f * bits)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(1)).to(act) if bias else None
    layer = QuantLinear.from_codes(codes, scales, zeros, gs, bits, bias=b, act_dtype=act)
    if not kernel:
        layer = QuantLinear(layer.packed, b, act, use_kernel=False)
    assert layer.uses_kernel == (kernel and qgemv_library() is not None)
    assert torch.equal(layer.dequantize(), dequantize_rows(codes, scales, zeros, gs))
    for m in ROWS + ([gemm_min_rows(bits) + 1] if act == torch.bfloat16 else []):
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(act)
        y = layer(x)
        assert y.shape == (m, out_f) and y.dtype == act
        bf16 = act == torch.bfloat16
        assert_close_to_reference(y, x, codes, scales, zeros, gs, b, rel_size(layer, m), 2 ** -8 if bf16 else 0)


def test_leading_dims_and_input_cast():
    codes, scales, zeros = random_quant(64, 128, 32, 4, seed=0)
    layer = QuantLinear.from_codes(codes, scales, zeros, 32, 4)
    x = torch.randn(2, 3, 128)
    y = layer(x)  # float32 in, bf16 module: computed and returned in bf16
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x.bfloat16().reshape(6, 128)).reshape(2, 3, 64))
    assert layer(torch.zeros(0, 128, dtype=torch.bfloat16)).shape == (0, 64)


def test_symmetric_scheme_is_a_constant_zero_point():
    codes, scales, _ = random_quant(64, 64, 64, 8, seed=2)
    zeros = torch.full((64, 1), 128, dtype=torch.uint8)
    w = QuantLinear.from_codes(codes, scales, zeros, 64, 8).dequantize()
    assert torch.equal(w, (codes.float() - 128) * scales.float())


def test_no_dense_copy_is_kept():
    codes, scales, zeros = random_quant(512, 512, 64, 4, seed=3)
    layer = QuantLinear.from_codes(codes, scales, zeros, 64, 4)
    held = layer.packed.nbytes() + sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert held / codes.numel() < 0.55  # codes 0.5 bytes per weight, scales and zeros 3 bytes per 64


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", [True, False])
def test_an_input_order_gathers_x_before_the_product(bits, act, kernel, one_thread):
    # Act-order checkpoints: column j of the codes multiplies input perm[j]. Against the reference on
    # x[:, perm], at decode rows and (bf16) the GEMM path; the layer's weight is in input order.
    out_f, in_f, gs = 100, 96, 32
    codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=7 * bits)
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(3))
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(2)).to(act)
    layer = QuantLinear.from_codes(codes, scales, zeros, gs, bits, bias=b, act_dtype=act, perm=perm)
    if not kernel:
        layer = QuantLinear(layer.packed, b, act, use_kernel=False, perm=perm)
    assert torch.equal(layer.dequantize()[:, perm], dequantize_rows(codes, scales, zeros, gs))
    bf16 = act == torch.bfloat16
    for m in [1, 3] + ([gemm_min_rows(bits) + 1] if bf16 else []):
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(act)
        y = layer(x)
        rel_s = rel_size(layer, m)
        assert_close_to_reference(y, x[:, perm], codes, scales, zeros, gs, b, rel_s, 2 ** -8 if bf16 else 0)
        unordered = reference_qmatmul(x, codes, scales, zeros, gs, b)  # without the gather: far off
        assert (y.double() - unordered).abs().max() > 10 * (y.double() - reference_qmatmul(
            x[:, perm], codes, scales, zeros, gs, b)).abs().max()


@pytest.mark.parametrize("perm, match", [(torch.arange(127), r"perm must be integers \[128\]"),
                                         (torch.zeros(128, dtype=torch.long), r"each input index 0..127 exactly once"),
                                         (torch.arange(128.0), r"perm must be integers")])
def test_a_bad_input_order_is_refused(perm, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_codes(torch.zeros(64, 128, dtype=torch.uint8), torch.ones(64, 4), torch.zeros(64, 4), 32, 4,
                               perm=perm)


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=48), r"group_size 48 does not divide in_features 128 \(codes 64x128\)"),
    (dict(group_size=24), r"group_size 24 does not divide"),
    (dict(bits=3), r"bits must be 4 or 8"),
    (dict(scales=torch.ones(64, 3)), r"scales must be \[out, in / group_size\] = \[64, 4\]"),
    (dict(zeros=torch.full((64, 4), 16)), r"zeros must lie in 0..15"),
    (dict(codes=torch.full((64, 128), 16, dtype=torch.uint8)), r"codes must lie in 0..15"),
    (dict(act_dtype=torch.float16), r"act_dtype must be torch.bfloat16 or torch.float32"),
])
def test_bad_arguments_are_refused_clearly(bad, match):
    args = dict(codes=torch.zeros(64, 128, dtype=torch.uint8), scales=torch.ones(64, 4), zeros=torch.zeros(64, 4),
                group_size=32, bits=4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_codes(**args)


def test_slimlm_cpu_kernels_0_selects_the_pytorch_path(monkeypatch):
    monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    codes, scales, zeros = random_quant(64, 64, 32, 4, seed=4)
    layer = QuantLinear.from_codes(codes, scales, zeros, 32, 4, act_dtype=torch.float32)
    assert not layer.uses_kernel
    x = torch.randn(3, 64)
    assert_close_to_reference(layer(x), x, codes, scales, zeros, 32, None, 1e-5, 0)


def test_an_empty_batch_through_an_act_order_layer_gives_an_empty_result():
    """A thread's first call with no rows found its gather buffer still NULL and aborted the process (run in a
    subprocess here, so that a regression fails this test, not the test run)."""
    import subprocess
    import sys

    code = """
import torch
from slimlm.serve.layers.quant_linear import QuantLinear
g = torch.Generator().manual_seed(0)
codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
scales, zeros = torch.rand(32, 2, generator=g) * 0.01 + 1e-3, torch.full((32, 2), 8, dtype=torch.uint8)
layer = QuantLinear.from_codes(codes, scales, zeros, 32, 4, act_dtype=torch.bfloat16, perm=torch.randperm(64, generator=g))
print(tuple(layer(torch.zeros(0, 64, dtype=torch.bfloat16)).shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "(0, 32)", (proc.returncode, proc.stderr[-2000:])
