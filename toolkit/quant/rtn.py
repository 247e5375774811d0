"""Round-to-nearest (RTN) quantization, and the scale/zero rule every method shares.

RTN rounds each weight to the nearest point of its group's grid, with no data. It is the baseline GPTQ
must beat, and the rule `group_params` (how a group's scale and zero point follow from its weights) is
also what GPTQ uses when it reaches a group, so the two differ only in how they round.
"""
from __future__ import annotations

import torch

from .qweight import QuantizedWeight, dequantize_codes, quantize_to_codes
from .scheme import QuantScheme


# Clipping candidates of `mse_clip`: the grid spans [p * min, p * max] for p = 1.00, 0.99, ..., 0.80.
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(21))
CLIP_NORM = 2.4  # the error |w - q|^2.4 summed over the group, as GPTQ's reference quantizer weighs it


def group_params(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for groups of weights `w` [..., k] (one group per leading index).

    Returns `(scale [...], zero [...])`, float32, with the scale already rounded to the scheme's scale
    dtype so codes are chosen against the scale that will be stored.

    The grid always contains 0, so zero weights stay exactly zero:
    - symmetric: zero = 2**(bits-1), scale = 2 * max|w| / maxq (the GPTQ convention: the grid covers
      [-8, 7] * scale for 4 bits, so +max|w| is clipped by half a step; kept for comparability with
      other GPTQ tools).
    - asymmetric: the grid spans [min(w, 0), max(w, 0)], zero = round(-min / scale). A zero point of 0
      cannot be stored in the GPTQ v1 format, so such groups (no weight below -scale/2) use zero = 1
      with scale = max / (maxq - 1), which still covers the group exactly.
    With `scheme.mse_clip` the range is shrunk per group to the candidate of `CLIP_SHRINKS` whose
    codes give the lowest sum of |w - dequantized|^2.4: clipping a few outliers buys a finer grid for
    the rest.
    """
    w = w.float()
    wmin = w.amin(dim=-1).clamp(max=0)  # [...]
    wmax = w.amax(dim=-1).clamp(min=0)  # [...]
    if not scheme.mse_clip:
        return _range_params(wmin, wmax, scheme)
    def error(scale, zero):  # [...]
        codes = quantize_to_codes(w, scale[..., None], zero[..., None], scheme.maxq)
        return (dequantize_codes(codes, scale[..., None], zero[..., None]) - w).abs().pow(CLIP_NORM).sum(-1)

    best_scale, best_zero = _range_params(wmin, wmax, scheme)  # p = 1: the unclipped range
    best_err = error(best_scale, best_zero)
    for p in CLIP_SHRINKS[1:]:
        scale, zero = _range_params(wmin * p, wmax * p, scheme)
        err = error(scale, zero)
        better = err < best_err
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def _range_params(wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    # The grid for a range [wmin <= 0, wmax >= 0] per group (see group_params).
    maxq = float((1 << scheme.bits) - 1)
    dtype = scheme.torch_scale_dtype
    # An all-zero group still needs a finite, positive scale: the smallest subnormal (fp16's smallest normal,
    # 6.1e-5, zeroed most weights of a group near 1e-5 and a quarter near 1e-4)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    if scheme.sym:
        absmax = torch.maximum(-wmin, wmax)
        scale = _round_to(2 * absmax / maxq, dtype, tiny)
        zero = torch.full_like(scale, float(scheme.sym_zero))
        return scale, zero
    scale = _round_to((wmax - wmin) / maxq, dtype, tiny)
    zero = torch.round(-wmin / scale)
    low = zero < 1
    if low.any():
        scale = torch.where(low, _round_to(wmax / (maxq - 1), dtype, tiny), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero.clamp(1, maxq)


def _round_to(scale: torch.Tensor, dtype: torch.dtype, tiny: float) -> torch.Tensor:
    """`scale` in `dtype`, rounded up where rounding to nearest would make it smaller: a smaller step would leave the
    ends of the group's range past the grid (an int8 group's extreme weight off by 1.4 steps with bf16 scales).
    Clamped first, so no scale is 0 (or inf in float16) and codes stay finite."""
    scale = scale.clamp(min=tiny, max=torch.finfo(dtype).max)
    stored = scale.to(dtype)
    # positive values: the next representable one up is the bit pattern plus one
    stored = torch.where(stored.float() < scale, (stored.view(torch.int16) + 1).view(dtype), stored)
    return stored.float()


def rtn_quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize a weight `w` [out, in] by rounding to nearest; groups are consecutive columns.

    The caller is expected to have checked the layer with `scheme.check_layer` (in_features must be
    divisible by the group size).
    """
    out_f, in_f = w.shape
    n_groups, length = scheme.groups(in_f), scheme.group_len(in_f)
    grouped = w.detach().float().reshape(out_f, n_groups, length)  # [out, G, gs]
    scale, zero = group_params(grouped, scheme)  # [out, G]
    codes = quantize_to_codes(grouped, scale[..., None], zero[..., None], scheme.maxq)  # [out, G, gs]
    g_idx = (torch.arange(in_f) // length).to(torch.int32)  # [in]
    return QuantizedWeight(codes.reshape(out_f, in_f).to(torch.uint8), scale, zero.to(torch.uint8), g_idx)


def rtn_dequantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`w` [out, in] after a round trip through RTN codes: float32, same shape."""
    return rtn_quantize(w, scheme).dequantize()
