"""Quantization-aware training (QAT): train a model through the quantized weights it will be served with.

`prepare_qat(model, scheme)` swaps each target linear (`calibrate.target_linears`: the decoder's
linears, LM head and embeddings skipped by default) for a `FakeQuantLinear` in place. Its forward
multiplies by the weight rounded to the scheme's grid; its backward is a straight-through estimator, so
the full-precision *latent* weight learns (see `fake_quant.py`). `convert_qat(model)` swaps them back to
plain `nn.Linear`s holding the dequantized weights and returns `{name: QuantizedWeight}`, exactly
what `quantize_model` returns, for `gptq_format.save_gptq` to pack: the checkpoint holds the very codes
the last forward pass used.

Two starts and two kinds of grid:
- `init="rtn"` (default): the latent weights are the model's own, and the grid is `dynamic`: every
  forward pass is `fake_quant(w)`, RTN's scale and zero point recomputed from the current latent
  weight. At step 0 the model is the RTN model, bit for bit.
- `init="gptq"`: `quantize_model(..., method="gptq")` runs first on calibration samples; the latent
  weights start at GPTQ's dequantized weights and the grid is `frozen` at GPTQ's scales, zero points
  and `g_idx` (RTN's rule would re-round GPTQ's weights onto another grid). At step 0 the model is the
  GPTQ model, bit for bit. Its latent weights sit exactly on grid points, half a step from the next
  code, so the first codes move later than from RTN's start (whose weights lie anywhere in their cells).
  A frozen grid can also be asked for with RTN (`grid="frozen"`).
On a frozen grid a latent weight that leaves the grid's range is clamped in the forward pass, and
the straight-through gradient still reaches it (no masking: the identity, as in `fake_quant`).

Precision: with float32 latent weights (float32 training, or autocast/"bf16-mixed", which keeps them
float32) the fake-quant weight equals the checkpoint's dequantized weight exactly. An engine that stores
the parameters themselves in bf16 (DeepSpeed with bf16) rounds the latent *and* the fake-quant weight to
bf16: the codes still follow the forward pass, but its weights differ from the exported ones by bf16's
rounding (2^-9 relative), as a bf16 serving kernel's would.

Memory: the latent weights stay float32; each forward pass builds one fake-quant copy per linear,
which autograd keeps for the backward pass (one extra copy of the quantized weights, float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimlmError
from .calibrate import decoder_layers, quantize_model, target_linears
from .fake_quant import fake_quant
from .qweight import QuantizedWeight, dequantize_codes, quantize_to_codes
from .rtn import rtn_quantize
from .scheme import QuantScheme

INITS = ("rtn", "gptq")
GRIDS = ("dynamic", "frozen")


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses its weight rounded to `scheme`'s grid (straight-through backward).

    `weight` [out, in] is the latent full-precision weight (the same parameter object as the wrapped
    `nn.Linear`'s, under the same name, so optimizers, checkpoints and ZeRO/FSDP see the usual keys);
    `bias` is kept as is. With a frozen grid, buffers `qat_scales`/`qat_zeros` [out, G] (float32) and
    `qat_g_idx` [in] (int64) hold it; they are saved in checkpoints with the weight.
    """

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, grid: QuantizedWeight | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = linear.in_features, linear.out_features, scheme
        self.weight = linear.weight  # [out, in]
        self.bias = linear.bias
        self.frozen = grid is not None
        if self.frozen:
            if grid.shape != (self.out_features, self.in_features):
                raise SlimlmError(f"grid of shape {grid.shape} for a linear of shape "
                                  f"{(self.out_features, self.in_features)}.")
            device = linear.weight.device
            self.register_buffer("qat_scales", grid.scales.float().to(device).clone())  # [out, G]
            self.register_buffer("qat_zeros", grid.zeros.float().to(device).clone())  # [out, G]
            self.register_buffer("qat_g_idx", grid.g_idx.long().to(device).clone())  # [in]

    def fake_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, [out, in], in the latent weight's dtype."""
        if not self.frozen:
            return fake_quant(self.weight, self.scheme)
        scale, zero = self._grid()
        w = self.weight
        if scale.dim() == 3:  # consecutive groups: work on the [out, G, gs] view, no gather
            grouped = w.reshape(scale.shape[0], scale.shape[1], -1)
            return _FrozenGrid.apply(grouped, scale, zero, self.scheme.maxq).reshape(w.shape)
        return _FrozenGrid.apply(w, scale, zero, self.scheme.maxq)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per weight: `[out, G, 1]` views when group j holds columns
        j*gs..(j+1)*gs-1 (checked each call: a checkpoint may load another g_idx), else `[out, in]`."""
        g, n_groups = self.qat_g_idx, self.qat_scales.shape[1]
        if self.in_features % n_groups == 0:
            consecutive = torch.arange(self.in_features, device=g.device) // (self.in_features // n_groups)
            if torch.equal(g, consecutive):
                return self.qat_scales[..., None], self.qat_zeros[..., None]
        return self.qat_scales[:, g], self.qat_zeros[:, g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        w = self.fake_weight()
        bias = self.bias
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts by itself
            w = w.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, bias)

    @torch.no_grad()
    def quantize(self) -> QuantizedWeight:
        """The codes, scales and zero points the forward pass uses now (what a checkpoint stores)."""
        if not self.frozen:
            return rtn_quantize(self.weight, self.scheme)
        g = self.qat_g_idx
        codes = quantize_to_codes(self.weight.detach().float(), self.qat_scales[:, g], self.qat_zeros[:, g],
                                  self.scheme.maxq)  # [out, in]: what _FrozenGrid computes, per column
        return QuantizedWeight(codes.to(torch.uint8).cpu(), self.qat_scales.cpu().clone(),
                               self.qat_zeros.to(torch.uint8).cpu(), self.qat_g_idx.to(torch.int32).cpu())

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int{s.bits} g{s.group_size} {'sym' if s.sym else 'asym'}, grid={'frozen' if self.frozen else 'dynamic'}")


class _FrozenGrid(torch.autograd.Function):
    """Round `w` to fixed `scale`/`zero` (broadcast against it); identity in the backward pass."""

    @staticmethod
    def forward(ctx, w, scale, zero, maxq):
        codes = quantize_to_codes(w.float(), scale, zero, maxq)  # [out, in]
        return dequantize_codes(codes, scale, zero).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quant_linears(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """`{qualified name: FakeQuantLinear}` of a model `prepare_qat` wrapped (empty if none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def check_qat_options(scheme: QuantScheme, init: str, grid: str | None) -> str:
    """The grid kind for `init` (dynamic for rtn, frozen for gptq unless given); SlimlmError on a bad mix."""
    if init not in INITS:
        raise SlimlmError(f"unknown QAT init {init!r}.", f"Expected one of: {', '.join(INITS)}.")
    grid = grid or ("dynamic" if init == "rtn" else "frozen")
    if grid not in GRIDS:
        raise SlimlmError(f"unknown QAT grid {grid!r}.", f"Expected one of: {', '.join(GRIDS)}.")
    if init == "gptq" and grid == "dynamic":
        raise SlimlmError("a dynamic grid recomputes RTN's scales every step and would re-round GPTQ's weights.",
                          "Use grid=frozen (the default with init=gptq), or init=rtn.")
    if init == "rtn" and scheme.act_order:
        raise SlimlmError("act_order is a GPTQ option; RTN rounds every column alike.",
                          "Drop act_order, or use init=gptq.")
    return grid


def prepare_qat(model: nn.Module, scheme: QuantScheme, init: str = "rtn", *, grid: str | None = None,
                samples: torch.Tensor | None = None, progress: bool = False, **gptq_kwargs) -> dict[str, FakeQuantLinear]:
    """Swap `model`'s target linears for `FakeQuantLinear`s, in place; return them by qualified name.

    Args:
        model: a HF causal LM with `model.model.layers` (Llama, Qwen2, Qwen3, Mistral, SmolLM2).
        scheme: the quantization scheme (bits, group size, symmetry, scale dtype, skip patterns).
        init: "rtn" (the latent weights are the model's) or "gptq" (GPTQ first, on `samples`).
        grid: "dynamic" (scales follow the latent weights, RTN's rule; init=rtn only) or "frozen"
            (scales, zero points and g_idx fixed at the start's); default by `init` (module doc).
        samples: calibration token ids [n, T] for GPTQ.
        progress, gptq_kwargs: passed to `quantize_model` (damp, block_size, compute_dtype, ...).
    """
    grid = check_qat_options(scheme, init, grid)
    if fake_quant_linears(model):
        raise SlimlmError("this model is already prepared for QAT (it holds FakeQuantLinear layers).",
                          "Call convert_qat(model) first, or start from a fresh model.")
    targets = target_linears(model, scheme)  # checks every layer against the scheme
    if init == "gptq":
        start = quantize_model(model, scheme, "gptq", samples, progress=progress, **gptq_kwargs)
    elif grid == "frozen":
        start = {name: rtn_quantize(m.weight, scheme) for name, m in targets.items()}
    else:
        start = {}
    wrapped = {}
    for name, linear in targets.items():
        wrapped[name] = FakeQuantLinear(linear, scheme, start.get(name))
        _replace(model, name, wrapped[name])
    return wrapped


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Swap every `FakeQuantLinear` back for an `nn.Linear` holding its dequantized weight, in place.

    Returns `{qualified name: QuantizedWeight}` (what `quantize_model` returns), ready for
    `gptq_format.save_gptq(model, tokenizer, state, scheme, out_dir)`. The converted model computes
    what the fake-quant model computed, and equals what `load_gptq` reads back from that checkpoint
    (up to the scale dtype, in which `save_gptq` stores the tensors that are not quantized).
    """
    wrapped = fake_quant_linears(model)
    if not wrapped:
        raise SlimlmError("this model holds no FakeQuantLinear layers to convert.", "Call prepare_qat(model, scheme) first.")
    state = {}
    for name, fq in wrapped.items():
        qw = fq.quantize()
        linear = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None,
                           device=fq.weight.device, dtype=fq.weight.dtype)
        linear.weight.copy_(qw.dequantize().to(linear.weight))
        if fq.bias is not None:
            linear.bias.copy_(fq.bias)
        linear.weight.requires_grad_(fq.weight.requires_grad)
        _replace(model, name, linear)
        state[name] = qw
    return state


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def qat_parameters(model: nn.Module, train: str = "quantized") -> list[nn.Parameter]:
    """Choose what trains: "quantized" (the latent weights and biases of the fake-quant linears; the rest
    frozen) or "all"; sets `requires_grad` accordingly and returns the trainable parameters."""
    if train not in ("quantized", "all"):
        raise SlimlmError(f"unknown QAT train setting {train!r}.", "Expected one of: quantized, all.")
    decoder_layers(model)
    if train == "quantized":
        model.requires_grad_(False)
        for fq in fake_quant_linears(model).values():
            fq.requires_grad_(True)
    else:
        model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
