"""Serve a GPTQ checkpoint from its packed codes: one quantized linear per (fused) projection.

On CPU that is `QuantLinear` (slimlm's C kernels), on a CUDA GPU `TritonQuantLinear` (Triton kernels).

`toolkit.quant.gptq_format.load_gptq` returns a plain HF model holding the *dequantized* weights
(so eval and every other tool can take it) and records its folder on the model (`slimlm_gptq_dir`).
`load_model` sees that attribute and builds, through `GPTQWeights.linear`, each projection whose
parts are all quantized in the folder from the codes, scales and zero points as stored: int4 g64
moves ~0.55 bytes per weight where bf16 moves 2, which is what decode's speed is bound by.

What stays dense (built from the HF model's dequantized weights, as before, and listed with its reason
in `GPTQWeights.dense`):
- layers the checkpoint did not quantize (the LM head and embeddings by default, `dynamic` exclusions);
  a fused projection (q|k|v, gate|up) is quantized only if all its parts are, in one bits and group size;
- act-order checkpoints whose `g_idx` is not `i // group_size` (`desc_act=True` without static
  groups) are served quantized with their columns sorted by group and the input order kept beside
  them (`perm`: the layer gathers `x[:, perm]`); only a `g_idx` whose groups are not all
  `group_size` inputs long stays dense, as do fused parts (q|k|v, gate|up) with different orders;
- anything the kernel cannot take (a group size that is not a multiple of 16, a v1 zero point past
  2^bits - 1, as AutoGPTQ writes for a zero point of 0) or a layer whose dequantized codes are not
  the HF model's weight (the model was changed after loading: its weights win).
The unexpected ones (all but not-quantized) are reported in one warning per model.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.quant.gptq_format import (GPTQ_DIR_ATTR, gptq_config, packed_bits, read_gptq_tensors,
                                              unpack_qweight, unpack_qzeros)

from ..kernels import use_triton
from ..kernels.quant_cpu import check_quant_args, dequantize_rows, repack, unpack_codes
from ..layers.quant_linear import ACT_DTYPES, QuantLinear

GPU_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the Triton kernels' (quant_triton.ACT_DTYPES)

NOT_QUANTIZED = "not quantized in the checkpoint"


def gptq_dir(hf_model: nn.Module) -> str | None:
    """The GPTQ folder `hf_model` was loaded from by `load_gptq`, or None."""
    folder = getattr(hf_model, GPTQ_DIR_ATTR, None)
    return folder if isinstance(folder, str) and folder else None


class GPTQWeights:
    """The packed layers of one GPTQ folder, checked against `reference` (the HF model's state dict).

    `linear(names, bias)` gives a quantized linear on `device` (QuantLinear on CPU, TritonQuantLinear on
    CUDA) for the projection that concatenates `names` along the output dim, or None (the caller builds
    it dense). `quantized` and `dense` record what went where.
    """

    def __init__(self, folder: str, reference: dict[str, Tensor], act_dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        allowed = GPU_ACT_DTYPES if self.device.type == "cuda" else ACT_DTYPES
        if act_dtype not in allowed:
            raise ValueError(f"quantized serving on {self.device.type} computes in {allowed}, not {act_dtype}")
        try:
            config = gptq_config(folder)
            self.layers = read_gptq_tensors(folder)
        except SlimlmError as err:
            raise ValueError(f"cannot read the GPTQ checkpoint {folder}: {err}") from err
        self.folder, self.reference, self.act_dtype = folder, reference, act_dtype
        self.offset = 0 if config.get("checkpoint_format") == "gptq_v2" else 1
        self.quantized: list[str] = []
        self.dense: dict[str, str] = {}

    def linear(self, names: list[str], bias: Tensor | None) -> nn.Module | None:
        """The quantized linear for the parts `names` ([out_i, in] each) fused along the output dim, or None."""
        parts = []
        for name in names:
            part = self._unpack(name)
            if isinstance(part, str):
                self._keep_dense(names, f"{name}: {part}" if len(names) > 1 and part != NOT_QUANTIZED else part)
                return None
            parts.append(part)
        if len({(c.shape[1], bits, gs, s.dtype) for c, s, _, gs, bits, _ in parts}) > 1:
            self._keep_dense(names, "its parts differ in bits, group size or scale dtype")
            return None
        perm = parts[0][5]
        if any((p[5] is None) != (perm is None) or (perm is not None and not torch.equal(p[5], perm)) for p in parts):
            self._keep_dense(names, "its parts have different act-order input orders")
            return None
        codes, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))  # along the output dim
        _, _, _, gs, bits, _ = parts[0]
        if self.device.type == "cuda":
            from ..layers.quant_linear_triton import TritonQuantLinear  # imports Triton: only where it runs

            layer = TritonQuantLinear.from_codes(codes, scales, zeros, gs, bits, bias, self.act_dtype, self.device,
                                                 perm=perm)
        else:
            layer = QuantLinear.from_codes(codes, scales, zeros, gs, bits, bias, self.act_dtype, perm=perm)
        self.quantized.extend(names)
        return layer

    def _keep_dense(self, names: list[str], reason: str) -> None:
        for name in names:
            self.dense[name] = reason

    def _unpack(self, name: str):
        """(codes uint8 [out, in], scales [out, G], zeros uint8 [out, G], group_size, bits, perm), or why not.

        `perm` is None, or for a scattered act-order `g_idx` the input order that makes the groups
        consecutive (the codes' columns are returned in that order)."""
        layer = self.layers.get(name)
        if layer is None:
            return NOT_QUANTIZED
        qweight, g_idx = layer["qweight"], layer["g_idx"]
        in_f, out_f = g_idx.numel(), qweight.shape[1]
        bits = packed_bits(qweight, in_f)
        if bits is None:
            return f"qweight {tuple(qweight.shape)} is not a 4- or 8-bit packing of {in_f} inputs"
        groups = layer["scales"].shape[0]
        if groups == 0 or in_f % groups:
            return f"{groups} groups do not divide {in_f} inputs"
        gs = in_f // groups
        g_idx, consecutive = g_idx.long(), torch.arange(in_f) // gs
        perm = None
        if not torch.equal(g_idx, consecutive):  # act-order: serve the columns sorted by group
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], consecutive):
                sizes = sorted(set(torch.bincount(g_idx, minlength=groups).tolist()))
                return (f"groups of {' and '.join(map(str, sizes))} inputs (g_idx), where the kernels need groups of "
                        f"one size ({gs} of the {in_f} inputs each)")
        codes = unpack_qweight(qweight, bits).to(torch.uint8)                    # [out, in]
        if perm is not None:
            codes = codes[:, perm]
        zeros = unpack_qzeros(layer["qzeros"], bits, self.offset)[:out_f]        # [out, G], int64
        scales = layer["scales"].T.contiguous()                                  # [out, G]
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 1 << bits):
            return f"zero points outside 0..{(1 << bits) - 1} (an AutoGPTQ v1 zero of 0)"
        zeros = zeros.to(torch.uint8)
        try:
            check_quant_args(codes, scales, zeros, gs, bits)
        except ValueError as err:
            return str(err)
        weight = self.reference.get(name + ".weight")
        if weight is None or tuple(weight.shape) != (out_f, in_f):
            return "the model has no weight of this shape"
        rows = [0, out_f - 1]  # a spot check: the dequantized rows must be what the model holds
        ref = dequantize_rows(codes[rows], scales[rows], zeros[rows], gs).to(weight.dtype)
        held = weight.detach()[rows].cpu()
        if not torch.equal(ref, held if perm is None else held[:, perm]):
            return "the model's weight is not the checkpoint's (changed after loading?): serving the model's"
        return codes, scales, zeros, gs, bits, perm

    def warn_unexpected(self) -> None:
        """One warning naming the projections kept dense for a reason other than not being quantized."""
        odd = {name: why for name, why in self.dense.items() if why != NOT_QUANTIZED}
        if odd:
            shown = "; ".join(f"{n} ({w})" for n, w in list(odd.items())[:4])
            warnings.warn(f"{len(odd)} quantized layer(s) of {self.folder} run dense (dequantized weights, no int4/int8 "
                          f"speed-up): {shown}{' ...' if len(odd) > 4 else ''}", stacklevel=3)


def absorb_mlp_orders(model: nn.Module) -> int:
    """Move each act-order `down_proj`'s input order onto the rows of the `gate_up_proj` before it.

    down_proj's inputs are `silu(gate) * up`, channel by channel, so serving gate's and up's output
    rows in down's input order hands down_proj its inputs already in that order: the same function,
    one activation gather fewer per layer (the widest one). Done for CPU `QuantLinear` pairs (rows
    are repacked once); elsewhere the gather stays. Returns the number of layers changed.
    """
    changed = 0
    for layer in model.layers:
        down, gate_up = layer.down_proj, layer.gate_up_proj
        if not (isinstance(down, QuantLinear) and down.perm is not None and isinstance(gate_up, QuantLinear)):
            continue
        order = down.perm.long()
        rows = torch.cat([order, order + order.numel()])  # gate's rows, then up's, in down's input order
        codes, scales, zeros = unpack_codes(gate_up.packed)  # [2 I, in], [2 I, G], [2 I, G]
        packed = repack(codes[rows], scales[rows], zeros[rows], gate_up.group_size, gate_up.bits)
        bias = None if gate_up.bias is None else gate_up.bias[rows]
        layer.gate_up_proj = QuantLinear(packed, bias, gate_up.act_dtype, use_kernel=gate_up.uses_kernel,
                                         perm=gate_up.perm)
        layer.down_proj = QuantLinear(down.packed, down.bias, down.act_dtype, use_kernel=down.uses_kernel)
        changed += 1
    return changed


def gptq_weights_for(hf_model: nn.Module, dtype: torch.dtype) -> GPTQWeights | None:
    """`GPTQWeights` for a model `load_gptq` returned, served in `dtype` on its device; None for any other model.

    The kernels run on CPU in bfloat16 or float32 and on CUDA (with Triton) in bfloat16, float16 or
    float32. A GPTQ model served otherwise, or whose folder can no longer be read, runs dense (its
    dequantized weights), with a warning.
    """
    folder = gptq_dir(hf_model)
    if folder is None:
        return None
    device = next(hf_model.parameters()).device
    cpu_ok = device.type == "cpu" and dtype in ACT_DTYPES
    gpu_ok = device.type == "cuda" and dtype in GPU_ACT_DTYPES and use_triton(device)
    if not (cpu_ok or gpu_ok):
        warnings.warn(f"{folder}: the int4/int8 kernels run on CPU in bfloat16 or float32 and on CUDA with Triton; "
                      f"serving {dtype} on {device.type} with the dequantized weights instead", stacklevel=3)
        return None
    try:
        return GPTQWeights(folder, hf_model.state_dict(), dtype, device)
    except ValueError as err:  # the folder moved or changed since loading: the model's own weights still serve
        warnings.warn(f"{err}; serving the model's dequantized weights instead", stacklevel=3)
        return None
