"""The Triton W4A16/W8A16 kernels against the plain reference (`reference_qmatmul`), on random weights.

Without a GPU they run under TRITON_INTERPRET=1 (set by conftest.py before Triton is imported), so
shapes stay small; the shapes are chosen so that the masks (M, N and K not multiples of the tiles),
several K tiles per split, split-K and groups narrower and wider than a K tile all run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton); these tests run "
                                              "its kernels on the CPU under TRITON_INTERPRET=1")

from slimlm.serve.kernels import triton_available  # noqa: E402
from slimlm.serve.kernels.quant_cpu import dequantize_rows, reference_qmatmul  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = triton_available(DEVICE)
IN_FRESH_PROCESS = os.environ.get("SLIMLM_KERNEL_TESTS_RERUN") == "1"
kernels = pytest.mark.skipif(
    not RUNNABLE and not IN_FRESH_PROCESS,
    reason="Triton was imported before TRITON_INTERPRET=1 was set (by a module collected earlier), so its "
           "kernels cannot run on the CPU in this process; test_rerun_in_a_fresh_process covers them")

if RUNNABLE:
    from slimlm.serve.kernels.quant_triton import dequantize, pack_for_triton, quant_matmul

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|


def random_weight(out_f, in_f, group_size, bits, scale_dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8)
    groups = in_f // group_size
    scales = (torch.rand(out_f, groups, generator=g) * 0.02 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, maxq + 1, (out_f, groups), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


def check(m, out_f, in_f, group_size, bits, dtype, bias=False, **kw):
    codes, scales, zeros = random_weight(out_f, in_f, group_size, bits,
                                         torch.float32 if dtype == torch.float32 else dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = pack_for_triton(codes, scales, zeros, group_size, bits, dtype, DEVICE)
    y = quant_matmul(x.to(DEVICE), w, None if b is None else b.to(DEVICE), **kw).cpu()
    # The kernels multiply bf16((c - z) * s), the weight a checkpoint in `dtype` would hold.
    w_ref = dequantize_rows(codes, scales, zeros, group_size).to(dtype)
    ref = x.double() @ w_ref.double().t() + (0 if b is None else b.double())
    assert y.dtype == dtype and y.shape == (m, out_f)
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    return y


KERNELS = {"gemv": {"kernel": "gemv"}, "dot": {"kernel": "dot"},
           "dot-reshape": {"kernel": "dot", "PER_CODE": False, "BLOCK_K": 32},
           "dot-gather": {"kernel": "dot", "PER_CODE": False, "GATHER": True, "BLOCK_K": 32}}


@kernels
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("group_size", [16, 32, 64, 96])
def test_fused_kernels_match_the_reference(kernel, bits, m, group_size):
    check(m, 80, 384, group_size, bits, torch.float32, bias=True, config=KERNELS[kernel])


@kernels
@pytest.mark.parametrize("path", ["per-code", "reshape", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [3, 17])
def test_dot_with_the_scale_after_the_product(path, dtype, bits, m):
    # one group per K tile: the codes minus zeros go into tl.dot, each column's scale multiplies the sum
    block_k = 16 * 32 // bits if path == "per-code" else 32
    check(m, 80, 3 * block_k, block_k, bits, dtype, bias=True,
          config={"kernel": "dot", "LATE_SCALE": True, "BLOCK_K": block_k, "PER_CODE": path == "per-code",
                  "GATHER": path == "gather"})


@kernels
def test_late_scale_needs_one_group_per_tile():
    codes, scales, zeros = random_weight(16, 256, 64, 4, torch.float32)
    w = pack_for_triton(codes, scales, zeros, 64, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="one group per K tile"):
        quant_matmul(torch.zeros(2, 256, device=DEVICE), w, config={"kernel": "dot", "LATE_SCALE": True,
                                                                     "BLOCK_K": 128})


@kernels
@pytest.mark.parametrize("m", [1, 3, 17, 40])
def test_default_choice(m):
    check(m, 80, 256, 64, 4, torch.float32, bias=True)


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
def test_half_activations(dtype, m):
    check(m, 48, 256, 64, 4, dtype)


@kernels
def test_split_k_sums_every_slice_once():
    one = check(2, 64, 512, 32, 4, torch.float32, config={"SPLIT_K": 1})
    four = check(2, 64, 512, 32, 4, torch.float32, config={"SPLIT_K": 4})
    assert torch.allclose(one, four, rtol=0, atol=1e-4)


@kernels
def test_odd_input_width_is_padded_inside_the_last_word():
    # 36 inputs, one group per row: int4 packs 8 codes a word, so the last word holds 4 real codes
    check(2, 32, 36, 36, 4, torch.float32)


@kernels
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_then_gemm_path(bits):
    codes, scales, zeros = random_weight(40, 64, 32, bits, torch.float32)
    w = pack_for_triton(codes, scales, zeros, 32, bits, torch.float32, DEVICE)
    assert torch.equal(dequantize(w).cpu(), dequantize_rows(codes, scales, zeros, 32))
    check(6, 40, 64, 32, bits, torch.float32, dense_min_rows=4)


@kernels
def test_agrees_with_the_cpu_reference_definition():
    codes, scales, zeros = random_weight(24, 64, 32, 4, torch.float32, seed=3)
    x = torch.randn(3, 64, dtype=torch.float32)
    w = pack_for_triton(codes, scales, zeros, 32, 4, torch.float32, DEVICE)
    y = quant_matmul(x.to(DEVICE), w).cpu()
    assert torch.allclose(y.double(), reference_qmatmul(x, codes, scales, zeros, 32), rtol=1e-5, atol=1e-5)


@kernels
def test_scales_that_bf16_cannot_hold_stay_exact():
    # fp16 GPTQ scales served in bf16: kept in float32, so the weight is the checkpoint's
    codes, scales, zeros = random_weight(32, 64, 32, 4, torch.float16)
    w = pack_for_triton(codes, scales, zeros, 32, 4, torch.bfloat16, DEVICE)
    assert w.scales.dtype == torch.float32
    exact = dequantize_rows(codes, scales, zeros, 32)
    got = dequantize(w).cpu()
    if DEVICE == "cuda":  # one round-to-nearest-even from the exact float32 product
        assert torch.equal(got, exact.to(torch.bfloat16))
    else:  # Triton's interpreter casts float32 to bf16 by truncation: within one bf16 step
        assert ((got.float() - exact).abs() <= exact.abs() * 2 ** -7).all()


@kernels
def test_triton_quant_linear_matches_the_cpu_quant_linear():
    # the GPU layer and the CPU layer built from the same codes compute the same function
    from slimlm.serve.layers.quant_linear import QuantLinear
    from slimlm.serve.layers.quant_linear_triton import TritonQuantLinear

    codes, scales, zeros = random_weight(48, 96, 32, 4, torch.float32, seed=5)
    bias = torch.randn(48)
    gpu = TritonQuantLinear.from_codes(codes, scales, zeros, 32, 4, bias, torch.float32, DEVICE)
    cpu = QuantLinear.from_codes(codes, scales, zeros, 32, 4, bias, torch.float32)
    x = torch.randn(2, 3, 96)
    assert torch.allclose(gpu(x.to(DEVICE)).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))  # act-order input order: the same
    gpu = TritonQuantLinear.from_codes(codes, scales, zeros, 32, 4, bias, torch.float32, DEVICE, perm=perm)
    cpu = QuantLinear.from_codes(codes, scales, zeros, 32, 4, bias, torch.float32, perm=perm)
    assert torch.allclose(gpu(x.to(DEVICE)).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())


@kernels
def test_a_gpus_tuned_table_is_read_and_checked(tmp_path, monkeypatch):
    from slimlm.serve.kernels import quant_triton

    table = tmp_path / "t.json"
    table.write_text(json.dumps({"device": "X", "configs": {"1": {"kernel": "gemv", "BLOCK_N": 64},
                                                            "64": {"kernel": "dense"}}}))
    monkeypatch.setenv(quant_triton.TUNED_ENV, str(table))
    quant_triton.tuned_configs.cache_clear()
    assert quant_triton.tuned_configs("X") == {1: {"kernel": "gemv", "BLOCK_N": 64}, 64: {"kernel": "dense"}}
    table.write_text(json.dumps({"configs": {"8": {"kernel": "marlin"}}}))
    quant_triton.tuned_configs.cache_clear()
    with pytest.raises(ValueError, match="kernel is one of"):
        quant_triton.tuned_configs("X")
    monkeypatch.setenv(quant_triton.TUNED_ENV, str(tmp_path / "missing.json"))
    quant_triton.tuned_configs.cache_clear()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        quant_triton.tuned_configs("X")
    quant_triton.tuned_configs.cache_clear()
    assert quant_triton.tuned_file("NVIDIA H200").name == "quant_triton_nvidia_h200.json"


@kernels
def test_tuned_configs_drive_the_choice(monkeypatch):
    # a tuned entry is followed (its LATE_SCALE dropped where the group size forbids it), "dense" dequantizes
    from slimlm.serve.kernels import quant_triton

    table = {1: {"kernel": "gemv", "BLOCK_N": 16, "BLOCK_K": 64},
             2: {"kernel": "dot", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "LATE_SCALE": True},
             9: {"kernel": "dense"}}
    monkeypatch.setattr(quant_triton, "_tuned", lambda m, device: dict(table[max(r for r in table if r <= m)]))
    codes, scales, zeros = random_weight(40, 256, 64, 4, torch.float32)
    x = torch.randn(12, 256)
    ref = x.double() @ dequantize_rows(codes, scales, zeros, 64).double().t()
    w = pack_for_triton(codes, scales, zeros, 64, 4, torch.float32, DEVICE)
    for m in (1, 5, 12):
        y = quant_matmul(x[:m].to(DEVICE), w).cpu()
        assert (y.double() - ref[:m]).abs().max() < 1e-4 * ref.abs().max()
    assert w.plans[1][1][0] == 1 and w.plans[1][2]["BLOCK_N"] == 16             # gemv, one program per row
    assert w.plans[5][2]["BLOCK_N"] == 32 and w.plans[5][2]["LATE_SCALE"] is False  # g64 < BLOCK_K 128
    assert w.plans[12] == "dense"


TUNED_TABLES = sorted((ROOT / "serve" / "kernels" / "tuned").glob("*.json"))


@kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("table", TUNED_TABLES, ids=lambda p: p.stem)
def test_every_shipped_tuned_config_computes_the_product(table, bits, monkeypatch):
    # the per-GPU tables in serve/kernels/tuned are what the engine runs: each entry, at its row count
    from slimlm.serve.kernels import quant_triton

    monkeypatch.setenv(quant_triton.TUNED_ENV, str(table))
    quant_triton.tuned_configs.cache_clear()
    configs = quant_triton.tuned_configs("any")
    quant_triton.tuned_configs.cache_clear()
    assert min(configs) == 1, "a table must say what runs from one row on"
    for rows, cfg in configs.items():
        kw = {"dense_min_rows": 0} if cfg["kernel"] == "dense" else {"config": cfg}
        check(min(rows, 65), 80, 256, 128, bits, torch.bfloat16, bias=True, **kw)


@kernels
def test_bad_input_is_named():
    codes, scales, zeros = random_weight(16, 64, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="does not divide"):
        pack_for_triton(codes, scales[:, :1].repeat(1, 3), zeros[:, :1].repeat(1, 3), 24, 4)
    w = pack_for_triton(codes, scales, zeros, 32, 4, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        quant_matmul(torch.zeros(2, 63, device=DEVICE), w)
    with pytest.raises(ValueError, match="activation dtype"):
        quant_matmul(torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE), w)


@pytest.mark.skipif(RUNNABLE or IN_FRESH_PROCESS, reason="the kernels run in this process")
def test_rerun_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1", SLIMLM_KERNEL_TESTS_RERUN="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
