"""`QuantizedWeight`: integer codes with their scales, zero points and group index, unpacked.

This is the in-memory result of RTN and GPTQ and the input of the GPTQ checkpoint packer. Everything
is kept in the weight's own column order; `g_idx[j]` says which group column `j` belongs to (for act-order
without static groups it is not `j // group_size`).

The dequantized weight is `scale * (code - zero)` with the scale and zero of the column's group. That one
formula lives here (`dequantize_codes`) and is used by RTN, GPTQ and fake-quant alike, so their results
agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`scale * (codes - zero)` in float32; all three broadcast against each other."""
    return scale.float() * (codes.float() - zero.float())


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round `w / scale` to the grid: `clamp(round(w / scale) + zero, 0, maxq)`, as float32 codes.

    Division (not multiplication by a reciprocal) so the result matches the reference GPTQ rounding.
    Computed in the promoted dtype of `w` and `scale` (float32, or float64 for reference runs).
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantizedWeight:
    """A linear weight `[out, in]` as codes plus per-(row, group) scales and zero points.

    Attributes:
        codes: `[out, in]` uint8, each in [0, maxq].
        scales: `[out, G]` float32, every value exactly representable in the scheme's scale dtype.
        zeros: `[out, G]` uint8, the true zero points (not the `zero - 1` the GPTQ v1 file stores).
        g_idx: `[in]` int32, the group of each input column.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for: `[out, in]` float32."""
        g = self.g_idx.long()
        return dequantize_codes(self.codes, self.scales[:, g], self.zeros[:, g])  # [out, in]

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Rows `start:stop` (output channels), e.g. q_proj out of a fused q/k/v result."""
        return QuantizedWeight(self.codes[start:stop].contiguous(), self.scales[start:stop].contiguous(),
                               self.zeros[start:stop].contiguous(), self.g_idx)
