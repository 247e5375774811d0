"""The linear seam: oneDNN-packed weights and slimlm's GEMV kernel against plain F.linear."""
import pytest
import torch
import torch.nn.functional as F

from slimlm.serve.layers import Linear, make_linear
from slimlm.serve.layers.linear import (PackedLinear, can_pack, gemv_library, packed_view,
                                        reference_packed_layout)

# (out, in): the first two have the kernel's layout in both dtypes; the last has it in neither.
SHAPES = [(128, 64), (192, 96), (100, 72)]


def reference(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, shape, rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape[0], generator=g).to(dtype) if bias else None
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    layer = make_linear(w, b)
    assert isinstance(layer, PackedLinear) == can_pack(w)
    y = layer(x)
    assert y.shape == (rows, shape[0]) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    else:
        # bf16 products summed in float32, rounded once: within a rounding step of F.linear, and
        # no further from the exact product than F.linear is.
        torch.testing.assert_close(y, F.linear(x, w, b))
        exact = reference(x, w, b)
        assert (y.double() - exact).abs().max() <= (F.linear(x, w, b).double() - exact).abs().max() * 1.01 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_read_from_the_packed_weight(dtype):
    """`rows` (a tied embedding's lookup) gathers rows of the weight out of the kernel's layout, bit for bit;
    it is offered exactly where the bytes are in that layout."""
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        w = torch.randn(shape, generator=g).to(dtype)
        if not can_pack(w):
            continue
        layer = PackedLinear(w)
        if layer.own_layout or layer.uses_gemv:  # slimlm's layout, or oneDNN's bytes checked to be it
            assert layer.has_rows
        if layer.has_rows:
            ids = torch.tensor([0, shape[0] - 1, 63, 64, 5, 5, shape[0] // 2])
            assert torch.equal(layer.rows(ids), w[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_used_where_the_layout_is_known(dtype):
    if gemv_library() is None:
        pytest.skip("slimlm's C kernels do not build here (no compiler or no AVX-512-BF16)")
    for shape in SHAPES:
        w = torch.randn(shape).to(dtype)
        if not can_pack(w):  # bf16 on a CPU without AVX-512, in a shape without the kernel's layout
            assert dtype == torch.bfloat16 and reference_packed_layout(w) is None
            with pytest.raises(ValueError, match="Use Linear instead"):
                PackedLinear(w)
            continue
        layer = PackedLinear(w)
        layout = reference_packed_layout(w)
        assert layer.uses_gemv == (layout is not None)
        if layout is not None and layer.own_layout:  # oneDNN could not hold it (bf16 without AVX-512): slimlm did
            assert dtype == torch.bfloat16 and torch.equal(layer.packed, layout)
        elif layout is not None:  # the bytes oneDNN wrote are the layout the kernel reads
            assert torch.equal(packed_view(layer.packed), layout)


def vdpbf16ps_order(x, w, b):
    # what the bf16 kernel computes, in both its forms: per output, float32 sums over input pairs, the
    # odd product added before the even one (each product of two bf16 is exact in float32), then the
    # bias, then one rounding to bf16
    xf, wf = x.float(), w.float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for k in range(0, x.shape[1], 2):
        acc = acc + xf[:, k + 1:k + 2] * wf[:, k + 1]
        acc = acc + xf[:, k:k + 1] * wf[:, k]
    if b is not None:
        acc = acc + b.float()
    return acc.to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_avx2_bf16_kernel_sums_in_vdpbf16ps_order(rows, bias):
    # bit for bit, each of the AVX2 form's tiles (one row; one pass per block up to 16 rows; copied slices beyond), called
    # directly on the kernel's layout
    from slimlm.serve.kernels import cpu_build

    if cpu_build.cpu_isa() != "avx2" or gemv_library() is None:
        pytest.skip(f"the kernels run in their {cpu_build.cpu_isa() or 'no'} form here: the AVX-512 form sums in "
                    "the hardware's vdpbf16ps (test_avx2_form reruns this file in the AVX2 form there)")
    w = torch.randn(192, 96, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    b = torch.randn(192).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    # Inputs 0-3 make the order visible after rounding: with x = 1 there, odd first gives
    # (0 + 2^24 + 1) -> 2^24, then (2^24 - 2^24 + 1) = 1; even first loses the 1 (2^24 + 1 is a tie, kept even).
    x[:, :4] = 1
    w[:, :4] = torch.tensor([1.0, 2.0 ** 24, 1.0, -2.0 ** 24])
    layout, y = reference_packed_layout(w), torch.empty(rows, 192, dtype=torch.bfloat16)
    gemv_library().slimlm_gemv_bf16(layout.data_ptr(), x.data_ptr(), y.data_ptr(), None if b is None else b.data_ptr(),
                                    rows, 192, 96, 2)
    assert torch.equal(y.view(torch.int16), vdpbf16ps_order(x, w, b).view(torch.int16))


def test_non_contiguous_and_strided_inputs():
    w = torch.randn(128, 64).bfloat16()
    layer = make_linear(w)
    wide = torch.randn(3, 128).bfloat16()
    x = wide[:, ::2]  # [3, 64], stride 2
    torch.testing.assert_close(layer(x), F.linear(x, w))


def test_weight_unpacks_and_switches(monkeypatch):
    w = torch.randn(128, 64)
    layer = make_linear(w)
    assert isinstance(layer, PackedLinear)
    torch.testing.assert_close(layer.weight, w, atol=0, rtol=0)
    monkeypatch.setenv("SLIMLM_CPU_KERNELS", "0")
    assert not make_linear(w).uses_gemv
    monkeypatch.setenv("SLIMLM_PACK_LINEAR", "0")
    plain = make_linear(w)
    assert isinstance(plain, Linear) and plain.weight.data_ptr() == w.data_ptr()


def test_packed_linear_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="Use Linear instead"):
        PackedLinear(torch.randn(8, 8).half())
    assert isinstance(make_linear(torch.randn(8, 8).half()), Linear)
