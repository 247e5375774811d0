"""`QuantScheme`: what a quantized weight looks like (bits, groups, symmetry, scale dtype, layout).

One scheme drives every part of the package, so RTN, GPTQ, fake-quant and the GPTQ checkpoint agree on
the grid a weight is rounded to:

- `bits` 4 or 8: codes are unsigned integers in [0, 2**bits - 1] (`maxq`).
- `group_size` 32/64/128 consecutive input columns share one scale and zero point per output row; -1
  means one group per row (per channel).
- `sym`: the zero point is fixed at 2**(bits-1) (8 for 4 bits) and the grid is centred on 0; otherwise
  each group gets its own zero point in [1, maxq] (not 0: the GPTQ v1 checkpoint stores `zero - 1`, and
  -1 does not fit its unsigned field; see `gptq_format.py`).
- `scale_dtype` float16 (what every GPTQ kernel reads) or bfloat16. Scales are rounded to it *before*
  the codes are chosen, so the stored checkpoint reproduces the quantized weights exactly.
- `act_order` (GPTQ's `desc_act`): quantize columns in order of decreasing Hessian diagonal.
  `static_groups` keeps the groups on consecutive columns even then (so `g_idx` stays `i // group_size`,
  which every kernel handles without a reorder); without it a group is `group_size` consecutive columns
  *in quantization order* and `g_idx` records where each column went.
- `skip`: regular expressions searched in a module's qualified name; matching modules stay in full
  precision. Only `nn.Linear` layers inside the decoder layers are ever quantized, so the defaults
  (`lm_head`, `embed`) only say so explicitly.

Layers whose sizes do not fit the scheme are refused, never padded: a padded layer would need a padded
checkpoint that HF-compatible loaders (vLLM, TGI, transformers) do not read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import SlimlmError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16}
DEFAULT_SKIP = ("lm_head", "embed")


@dataclass(frozen=True)
class QuantScheme:
    """A weight quantization scheme; validated on construction (SlimlmError names the bad field)."""

    bits: int = 4
    group_size: int = 64
    sym: bool = True
    scale_dtype: str = "float16"
    act_order: bool = False
    static_groups: bool = False
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP)
    # Search each group's clipping range for the lowest rounding error instead of spanning [min, max]
    # (`rtn.group_params`); the stored format is unchanged.
    mse_clip: bool = False

    def __post_init__(self):
        if self.bits not in BITS or type(self.bits) is not int:  # not True, not 4.0
            raise SlimlmError(f"quantization bits must be 4 or 8, got {self.bits!r}.",
                              "Use 4 (int4) or 8 (int8).")
        if self.group_size not in GROUP_SIZES or type(self.group_size) is not int:
            raise SlimlmError(f"group size must be one of 32, 64, 128 or -1 (per channel), got {self.group_size!r}.",
                              "Pass e.g. --group-size 64; smaller groups are more accurate and a little larger.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SlimlmError(f"unknown scale dtype {self.scale_dtype!r}.",
                              f"Expected one of: {', '.join(SCALE_DTYPES)}.")
        # Normalised so equal schemes compare equal and the checkpoint records one spelling.
        object.__setattr__(self, "scale_dtype", str(SCALE_DTYPES[self.scale_dtype]).removeprefix("torch."))
        if self.static_groups and not self.act_order:
            raise SlimlmError("static_groups only changes how act-order forms groups; it needs act_order.",
                              "Pass --act-order with --static-groups, or drop --static-groups.")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        for pattern in skip:
            try:
                re.compile(pattern)
            except re.error as err:
                raise SlimlmError(f"skip pattern {pattern!r} is not a valid regular expression ({err}).",
                                  "Skip patterns are Python regexes searched in module names, e.g. 'lm_head' "
                                  r"or 'layers\.0\.'.") from None
        object.__setattr__(self, "skip", skip)

    @property
    def maxq(self) -> int:
        """The largest code: 15 for 4 bits, 255 for 8."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The zero point of every group of a symmetric scheme: 8 for 4 bits, 128 for 8."""
        return 1 << (self.bits - 1)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def pack_factor(self) -> int:
        """Codes per int32 in the packed checkpoint: 8 for 4 bits, 4 for 8."""
        return 32 // self.bits

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (1 when per channel)."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        """Columns per group: `group_size`, or all of them when per channel."""
        return in_features if self.group_size == -1 else self.group_size

    def is_skipped(self, name: str) -> bool:
        """True if module `name` matches a skip pattern and stays in full precision."""
        return any(re.search(pattern, name) for pattern in self.skip)

    def check_layer(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a linear layer whose sizes the scheme (and the packed format) cannot hold.

        Needed: `in_features` divisible by the group size (groups never straddle rows of the packed
        weight), and both sizes divisible by the codes per int32 (`qweight` packs along the input,
        `qzeros` along the output dimension).
        """
        if self.group_size != -1 and in_features % self.group_size:
            fits = [str(g) for g in GROUP_SIZES if g > 0 and in_features % g == 0]
            raise SlimlmError(
                f"layer {name} has in_features={in_features}, which is not divisible by the group size "
                f"{self.group_size}.",
                (f"Choose a group size that divides it ({', '.join(fits)}), use" if fits else
                 "None of the group sizes 32, 64, 128 divides it: use") + " --group-size -1 (per channel), "
                f"or keep the layer in full precision with a skip pattern such as {re.escape(name)!r}.")
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % self.pack_factor:
                raise SlimlmError(
                    f"layer {name} has {what}={size}, which is not divisible by {self.pack_factor} "
                    f"({self.bits}-bit codes per int32 in the GPTQ format).",
                    f"Keep the layer in full precision with a skip pattern such as {re.escape(name)!r}.")

    def to_dict(self) -> dict:
        """A JSON-ready description (for the export manifest)."""
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "scale_dtype": self.scale_dtype, "act_order": self.act_order,
                "static_groups": self.static_groups, "skip": list(self.skip), "mse_clip": self.mse_clip}
