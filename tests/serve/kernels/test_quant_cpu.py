"""The int4/int8 CPU kernels (serve/kernels/cpu/qgemv.c) against the float64 reference, and the repacked layout.

Tolerances, from what each path computes (S = |x| @ |W|.T + |bias|, the size of the sum's terms):
- exact kernel (`qgemv`): products of bf16 parts of x and exact bf16 codes, summed in float32, then
  scaled per group. The sums carry codes offset by 128 (int4) or 2176 (int8), up to ~40x the terms of
  x @ W, so float32 rounding reaches ~1e-6 S on these sizes (measured); 2e-5 S bounds it with margin
  and still fails an x rounded to bf16 (2^-9 S). bf16 outputs add one rounding: 2^-9 |y| <= 2^-8 |ref|.
  (The AVX2 form sums codes times float32 x in FMAs, without the offset: inside the same bounds.)
- dequantize-then-GEMM (`qgemm_bf16`, bf16 only): each weight rounded to bf16 once, |dw| <= 2^-9 |w|,
  so |dy| <= 2^-9 S, plus the output rounding.
"""
import pytest
import torch

from slimlm.serve.kernels import quant_cpu as qc

# (out, in, group_size): in and out multiples of 64 and not; group 32/64/128 and one group per row (odd too).
CASES = [(128, 128, 32), (128, 128, 128), (192, 192, 64), (100, 96, 32), (70, 160, 160), (130, 75, 75),
         (64, 64, 64), (33, 256, 128)]
ROWS = [1, 2, 3, 4, 5, 16, 33]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The reference's small ops with two threads wait whenever a neighbour holds a core (seconds per test
    # on a busy shared machine); the kernels get their thread count as an argument, 2 where it matters.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_quant(out_f, in_f, gs, bits, seed, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // gs, generator=g) * 0.02 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, maxq + 1, (out_f, in_f // gs), generator=g, dtype=torch.uint8)
    return codes, scales, zeros


def check(y, x, codes, scales, zeros, gs, bias, rel_s, rel_ref, offset=None):
    ref = qc.reference_qmatmul(x, codes, scales, zeros, gs, bias)
    w = qc.dequantize_rows(codes, scales, zeros, gs)
    if offset is not None:  # the size of the kernel's own float32 terms: s * (c + offset)
        w = qc.dequantize_rows(codes.float() + offset, scales, torch.zeros_like(zeros), gs)
    size = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        size = size + bias.double().abs()
    err = (y.double() - ref).abs()
    bound = rel_s * size + rel_ref * ref.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert bool((err <= bound).all()), f"max err / bound {(err / bound).max().item():.3g}"


def test_repack_round_trips():
    for bits in (4, 8):
        for out_f, in_f, gs in CASES:
            codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=out_f + in_f)
            p = qc.repack(codes, scales, zeros, gs, bits)
            assert p.codes.numel() == -(-out_f // 64) * 64 * p.steps * 64 // 64
            c2, s2, z2 = qc.unpack_codes(p)
            assert torch.equal(c2, codes) and torch.equal(s2, scales) and torch.equal(z2, zeros)
            c3, _, _ = qc.unpack_codes(p, slice(10, out_f - 1))
            assert torch.equal(c3, codes[10:out_f - 1])


def test_int4_g64_bytes_per_weight():
    codes, scales, zeros = random_quant(1024, 1024, 64, 4, seed=0)
    assert qc.repack(codes, scales, zeros, 64, 4).nbytes() / codes.numel() == pytest.approx(0.5 + 3 / 64)


def test_float32_scales_are_stored_in_the_16_bit_dtype_that_holds_them_exactly():
    codes, scales, zeros = random_quant(64, 64, 32, 4, seed=1)
    assert qc.repack(codes, scales.float(), zeros, 32, 4).scales.dtype == torch.float16
    assert qc.repack(codes, scales.bfloat16().float(), zeros, 32, 4).scales.dtype in (torch.bfloat16, torch.float16)
    odd = scales.float() * (1 + 2 ** -20)
    assert qc.repack(codes, odd, zeros, 32, 4).scales.dtype == torch.float32


needs_kernel = pytest.mark.skipif(qc.qgemv_library() is None,
                                  reason="no C kernel here (it needs Linux on x86-64 with AVX2 or AVX-512, and cc)")


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_exact_kernel_matches_reference(bits, case, act, bias):
    out_f, in_f, gs = case
    codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=bits * 1000 + out_f)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(7)).to(act) if bias else None
    p = qc.repack(codes, scales, zeros, gs, bits)
    lib = qc.qgemv_library()
    for m in ROWS:
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(act)
        y = qc.qgemv(lib, p, x, None if b is None else b.float(), threads=1)
        check(y, x, codes, scales, zeros, gs, b, rel_s=2e-5, rel_ref=2 ** -8 if act == torch.bfloat16 else 0)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_kernel_matches_reference(bits, case, bias):
    out_f, in_f, gs = case
    codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=bits * 1000 + out_f, scale_dtype=torch.bfloat16)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(7)).bfloat16() if bias else None
    p = qc.repack(codes, scales, zeros, gs, bits)
    for m in ROWS + [130]:  # 130: more than one 128-row chunk
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).bfloat16()
        y = qc.qgemm_bf16(qc.qgemv_library(), p, x, None if b is None else b.float(), threads=1)
        check(y, x, codes, scales, zeros, gs, b, rel_s=2 ** -9 * 1.01 + 2e-5, rel_ref=2 ** -8)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_gemm_kernel_is_the_bf16_weight_summed_in_vdpbf16ps_order(bits, rows):
    # Bit for bit, in both forms (AVX-512: vdpbf16ps; AVX2: gemv.c's tile on the dequantized block): each
    # weight bf16((c - z) * s), per output float32 sums over input pairs, the odd product added before the
    # even one, then the bias, one rounding. Inputs 0-3 make the order visible: weights 1 there and
    # x = (1, 2^24, 1, -2^24) give 1 with the odd product first and 0 with the even one first.
    out_f, in_f, gs = 100, 256, 64
    codes, scales, zeros = random_quant(out_f, in_f, gs, bits, seed=rows, scale_dtype=torch.bfloat16)
    scales[:, 0] = 1.0
    zeros[:, 0] = zeros[:, 0].clamp(max=(1 << bits) - 2)
    codes[:, :4] = (zeros[:, :1] + 1).expand(-1, 4)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).bfloat16()
    x[:, :4] = torch.tensor([1.0, 2.0 ** 24, 1.0, -2.0 ** 24])
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = qc.qgemm_bf16(qc.qgemv_library(), qc.repack(codes, scales, zeros, gs, bits), x, b.float(), threads=2)
    w = qc.dequantize_rows(codes, scales, zeros, gs).bfloat16().float()
    acc = torch.zeros(rows, out_f)
    for k in range(0, in_f, 2):
        acc = acc + x[:, k + 1:k + 2].float() * w[:, k + 1]
        acc = acc + x[:, k:k + 1].float() * w[:, k]
    assert torch.equal(y.view(torch.int16), (acc + b.float()).bfloat16().view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_rows_are_independent_of_batch_and_threads(bits, act):
    # Each row is summed in the same order whatever the batch and thread count: batching a sequence
    # with others does not change its outputs (on one path). Big enough for both kernels to use threads.
    codes, scales, zeros = random_quant(1100, 128, 32, bits, seed=3)
    p = qc.repack(codes, scales, zeros, 32, bits)
    lib = qc.qgemv_library()
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(0)).to(act)
    full = qc.qgemv(lib, p, x, None, threads=2)
    assert torch.equal(full, qc.qgemv(lib, p, x, None, threads=1))
    for r in range(9):
        assert torch.equal(full[r:r + 1], qc.qgemv(lib, p, x[r:r + 1].contiguous(), None, threads=2))
    if act == torch.bfloat16:
        x = torch.randn(140, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
        full = qc.qgemm_bf16(lib, p, x, None, threads=2)
        assert torch.equal(full, qc.qgemm_bf16(lib, p, x, None, threads=1))
        assert torch.equal(full[5:6], qc.qgemm_bf16(lib, p, x[5:6].contiguous(), None, threads=2))
        check(full, x, codes, scales, zeros, 32, None, rel_s=2 ** -9 * 1.01 + 2e-5, rel_ref=2 ** -8)


@needs_kernel
def test_exact_kernel_per_channel_float32_scales_and_extreme_codes():
    out_f, in_f = 96, 200
    for bits in (4, 8):
        maxq = (1 << bits) - 1
        codes = torch.full((out_f, in_f), maxq, dtype=torch.uint8)
        codes[::2] = 0
        scales = torch.rand(out_f, 1, dtype=torch.float32) + 0.1  # not exact in 16 bits: kept as float32
        zeros = torch.randint(0, maxq + 1, (out_f, 1), dtype=torch.uint8)
        p = qc.repack(codes, scales, zeros, in_f, bits)
        assert p.scales.dtype == torch.float32
        x = torch.randn(3, in_f, dtype=torch.float32)
        # Rows whose codes equal their zero are exact zeros: the error left is float32 rounding of the
        # offset sums, so it is measured against them.
        check(qc.qgemv(qc.qgemv_library(), p, x, None, 2), x, codes, scales, zeros, in_f, None, 1e-6, 0,
              offset=128 if bits == 4 else 2176)
