"""GPTQ (Frantar et al. 2022): quantize a linear layer column by column, compensating each column's
rounding error on the columns not yet quantized, weighted by the layer's input Hessian.

For a layer `y = x W^T` and calibration inputs X, the output error of a quantized Q is
`||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) / 2` with `H = 2 X^T X`. Quantizing column j and moving
its error onto the later columns along row j of the upper Cholesky factor of `H^-1` is the optimal
(OBS) update; after the update the remaining problem has the same form. Implementation choices:

- Dampening: `damp * mean(diag H)` is added to the diagonal, so H is safely positive definite even
  when a few input channels are (nearly) dead. If Cholesky still fails, the dampening grows 10x
  (up to 3 tries) with a warning rather than aborting a long calibration.
- Dead inputs (diag H == 0) are zeroed in W: they never influence the output.
- Lazy block updates: inside a block of `block_size` columns the update is applied column by column
  to the block only; the rest of W gets the whole block's error in one matmul, which keeps the work
  in BLAS instead of `in_features` rank-1 updates of the full matrix.
- Groups: a group's scale and zero point are computed when its first column is reached, from the
  weights as updated by the columns already quantized (so they fit what is actually rounded).
- Act-order (`desc_act`): columns are processed by decreasing diag(H), so the most active inputs are
  quantized first, while most columns are still free to absorb their error. With static groups the
  groups are fixed beforehand on consecutive columns of the original W; otherwise groups are runs of
  the permuted order and `g_idx` records each column's group.

Rows are independent given H, so layers that share one input (q/k/v; gate/up) can be quantized as one
stacked weight with one Hessian and one Cholesky factorisation; see `calibrate.py`.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import SlimlmError
from .qweight import QuantizedWeight, quantize_to_codes
from .rtn import group_params
from .scheme import QuantScheme

HESSIAN_CHUNK = 2048  # tokens per X^T X product: bounds how much a bf16 partial sum rounds


class Hessian:
    """The running `H = 2/N * sum_t x_t x_t^T` of a layer's inputs, `[in, in]` float32.

    By default each chunk's `X^T X` runs in float32, whatever the dtype of `x`: H then stays positive
    semi-definite. With `fast=True` and bf16 inputs the products run in bf16 instead (about 3x faster
    on CPUs with AVX-512 BF16), each chunk of `HESSIAN_CHUNK` tokens rounded once to bf16 and summed in
    float32. That rounding (~2^-9 per entry) can push near-zero eigenvalues below zero: measured on
    SmolLM2, bf16 Hessians of the attention output (rank-deficient under GQA) of 2 of 3 layers lost
    positive definiteness (by up to 8% of mean(diag H)), while the other Hessians stayed positive
    definite and gave the same GPTQ error as float32 ones. Calibration therefore builds fast Hessians
    and rebuilds one in float32 only when it fails (`gptq_quantize(..., escalate=False)`).
    """

    def __init__(self, in_features: int, fast: bool = False, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [in, in]
        self.tokens = 0
        self.fast = fast
        self.rounded = False  # True once a product ran in bf16

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs `x` [..., in] (every leading index is one token)."""
        x = x.reshape(-1, x.shape[-1])  # [N, in]
        for chunk in x.split(HESSIAN_CHUNK):
            if self.fast and chunk.dtype == torch.bfloat16:
                self.rounded = True
                self.sum += (chunk.T @ chunk).float()  # [in, in]
            else:
                _add_gram(self.sum, chunk.float())
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """`H` [in, in] float32; raises if nothing was added."""
        if self.tokens == 0:
            raise SlimlmError("no calibration tokens reached this layer.", "Pass at least one calibration sample.")
        return self.sum * (2.0 / self.tokens)


def _add_gram(out: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """`out += x^T x` for `x` [N, in], computing only the blocks on and above the diagonal (the rest is
    their transpose): (blocks + 1) / (2 * blocks) of the full product's work, 1.5x faster at 4 blocks."""
    n = x.shape[1]
    step = -(-n // blocks)
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = x[:, start:stop].T @ x[:, start:]  # [stop - start, n - start]
        out[start:stop, start:] += part
        if stop < n:
            out[stop:, start:stop] += part[:, stop - start:].T


class NotPositiveDefinite(Exception):
    """`H + damp * mean(diag H) * I` has no Cholesky factor (raised only when escalation is off)."""


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, damp: float = 0.01,
                  block_size: int = 128, dtype: torch.dtype = torch.float32,
                  escalate: bool = True) -> QuantizedWeight:
    """Quantize `w` [out, in] with GPTQ against the input Hessian `H` [in, in].

    Args:
        w: the weight (any float dtype; not modified).
        H: `2 X^T X / N` of the layer's calibration inputs (see `Hessian`).
        scheme: bits, group size, symmetry, scale dtype, act-order and static groups.
        damp: fraction of mean(diag H) added to the diagonal (GPTQ's `percdamp`).
        block_size: columns per lazy-update block; rounded up to a multiple of the group size.
        dtype: working precision of the updates (float32; float64 for reference tests).
        escalate: if the dampened H is not positive definite, retry with 10x the dampening (with a
            warning); if False, raise `NotPositiveDefinite` so the caller can build a better H.

    Returns:
        A `QuantizedWeight` in the original column order, whose `dequantize()` is the GPTQ weight.
    """
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise SlimlmError(f"GPTQ got a Hessian of shape {tuple(H.shape)} for a weight with {in_f} inputs.")
    W = w.detach().to(dtype).clone()  # [out, in]
    H = H.detach().to(dtype).clone()  # [in, in]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    length = scheme.group_len(in_f)
    n_groups = scheme.groups(in_f)
    scales = torch.zeros(out_f, n_groups, dtype=torch.float32)  # [out, G]
    zeros = torch.zeros(out_f, n_groups, dtype=torch.float32)  # [out, G]
    fixed = scheme.group_size == -1 or scheme.static_groups  # groups known before any update
    if fixed:
        grouped = W.reshape(out_f, n_groups, length)  # [out, G, gs]
        scales, zeros = group_params(grouped, scheme)  # [out, G] each

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp, escalate)  # [in, in], upper triangular

    # Group of the column at each processing position.
    order = perm if perm is not None else torch.arange(in_f)
    pos_group = order // length if fixed else torch.arange(in_f) // length  # [in]
    groups_at = pos_group.tolist()
    # Work on W^T: a column of W is then a contiguous row, and the per-column update is one BLAS ger.
    WT = W.T.contiguous()  # [in, out], processing order
    del W
    codes = torch.zeros(in_f, out_f, dtype=torch.uint8)  # [in, out], processing order
    scales_t, zeros_t = scales.T.to(dtype).contiguous(), zeros.T.to(dtype).contiguous()  # [G, out]
    step = -(-max(block_size, length) // length) * length if scheme.group_size != -1 else block_size
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        W1 = WT[i1:i2].clone()  # [b, out]
        Err1 = torch.zeros_like(W1)  # [b, out]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            col = i1 + i
            g = groups_at[col]
            if not fixed and col % length == 0:  # first column of a group: its grid, from current W
                s_g, z_g = group_params(W1[i:i + length].T, scheme)  # [out] each
                scales[:, g], zeros[:, g] = s_g, z_g
                scales_t[g], zeros_t[g] = s_g, z_g
            s, z = scales_t[g], zeros_t[g]  # [out]
            w = W1[i]  # [out]
            q = quantize_to_codes(w, s, z, scheme.maxq)  # [out]
            codes[col] = q
            # s * (q - z) is `dequantize_codes` (same operations, so the same bits) minus 3 casts
            err = (w - s * (q - z)).div_(Hinv1[i, i])  # [out]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # [b - i, out]
            Err1[i] = err
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # [in - i2, out]: the block's error at once

    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[invperm]
        g_idx = pos_group[invperm]  # [in]: group of each original column
    else:
        g_idx = pos_group
    return QuantizedWeight(codes.T.contiguous(), scales.float(), zeros.to(torch.uint8), g_idx.to(torch.int32))


def _inverse_cholesky(H: torch.Tensor, damp: float, escalate: bool = True) -> torch.Tensor:
    """Upper Cholesky factor U of `(H + damp * mean(diag H) * I)^-1`, i.e. `U^T U = H^-1`.

    With J the index reversal and `J H J = L L^T`, `H^-1 = (J L^-1 J)^T (J L^-1 J)` and `J L^-1 J` is
    upper triangular: one Cholesky and one triangular inverse, instead of inverting H and factoring
    the inverse.
    """
    if not damp > 0:
        raise SlimlmError(f"GPTQ dampening must be positive, got {damp}.", "The usual value is 0.01.")
    mean_diag = torch.diag(H).mean()
    idx = torch.arange(H.shape[0])
    flipped = H.flip(0, 1)  # J H J
    for attempt in range(4):
        Hd = flipped.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)  # J L^-1 J
        if not escalate:
            raise NotPositiveDefinite
        if attempt < 3:
            warnings.warn(f"GPTQ: Hessian not positive definite with dampening {damp:g}; "
                          f"retrying with {damp * 10:g}.", stacklevel=3)
            damp *= 10
    raise SlimlmError("GPTQ: the layer's input Hessian stayed singular even with large dampening.",
                      "Calibrate with more (or more varied) samples, or use --method rtn.")
