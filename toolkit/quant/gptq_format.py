"""The GPTQ checkpoint format, as vLLM, SGLang, TGI and transformers (+ gptqmodel) read it.

Per quantized linear `<name>` (weights `[out, in]`, `G` groups, `pf = 32 / bits` codes per int32):

| tensor            | dtype | shape            | content                                                   |
|-------------------|-------|------------------|-----------------------------------------------------------|
| `<name>.qweight`  | int32 | `[in / pf, out]` | codes packed along the input dim: word r of column o holds |
|                   |       |                  | inputs r*pf .. r*pf+pf-1, input r*pf+j in bits j*bits..    |
| `<name>.qzeros`   | int32 | `[G, out / pf]`  | zero points packed the same way along the output dim      |
| `<name>.scales`   | fp16  | `[G, out]`       | one scale per (group, output)                              |
| `<name>.g_idx`    | int32 | `[in]`           | group of each input (`i // group_size` unless act-order)   |
| `<name>.bias`     | fp16  | `[out]`          | if the layer has one                                       |

and `config.json` gets `quantization_config = {quant_method: "gptq", bits, group_size, desc_act, sym,
checkpoint_format: "gptq", ...}`. Words are little-endian bit fields, low bits first; int32 is the
two's-complement view of the unsigned word.

The zero-point convention (checkpoint_format "gptq", a.k.a. v1): the stored field is `zero - 1`, and
readers compute `w = scale * (q - (stored + 1))`. This is the original GPTQ/AutoGPTQ layout (AutoGPTQ
subtracted 1 when packing and its kernels add it back); vLLM's `gptq_gemm` adds 1 unless the config says
`checkpoint_format: "gptq_v2"`, where zeros are stored as they are. A symmetric 4-bit scheme therefore
stores 7 (`0x77777777` per word) for its zero point 8, 8-bit stores 127 for 128. A zero point of 0 cannot
be stored (the field is unsigned), which is why `group_params` never produces one.

Everything else in the model (embeddings, norms, an untied lm_head) is stored in the scale dtype
(float16 by default), which is also the `dtype` recorded in config.json: the dtype GPTQ kernels run in.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import SlimlmError
from .lm_head import HEAD_NAME
from .qweight import QuantizedWeight, dequantize_codes
from .scheme import QuantScheme

PACKED = ("qweight", "qzeros", "scales", "g_idx")
GPTQ_DIR_ATTR = "slimlm_gptq_dir"  # set by load_gptq on the model it returns: the folder it read
_WORD = 1 << 32


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `values` [..., N] (each < 2**bits) into int32 words along the last dim: [..., N*bits/32]."""
    pf = 32 // bits
    v = values.to(torch.int64)
    if v.shape[-1] % pf:
        raise SlimlmError(f"cannot pack {v.shape[-1]} values into whole int32 words of {pf}.")
    if v.numel() and (v.min() < 0 or v.max() >= (1 << bits)):
        raise SlimlmError(f"values to pack must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing.")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // pf, pf)  # [..., words, pf]
    shifts = torch.arange(pf, dtype=torch.int64, device=v.device) * bits  # [pf], beside the codes (QAT's may be on a GPU)
    words = (v << shifts).sum(-1)  # [..., words], in [0, 2**32)
    return torch.where(words >= (1 << 31), words - _WORD, words).to(torch.int32)


def unpack_last(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_last`: int32 words [..., M] -> unsigned values [..., M*32/bits] (int64)."""
    pf = 32 // bits
    words = packed.to(torch.int64) & (_WORD - 1)  # [..., M], unsigned
    shifts = torch.arange(pf, dtype=torch.int64, device=packed.device) * bits  # [pf]
    v = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [..., M, pf]
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * pf)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] -> `qweight` int32 [in * bits / 32, out]."""
    return pack_last(codes, bits).T.contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """`qweight` int32 [in * bits / 32, out] -> codes [out, in] (int64)."""
    return unpack_last(qweight.T, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [out, G] -> `qzeros` int32 [G, out * bits / 32], storing `zero - 1` (v1)."""
    z = zeros.to(torch.int64)
    if z.numel() and z.min() < 1:
        raise SlimlmError("a zero point of 0 cannot be stored in the GPTQ (v1) format, which stores zero - 1.",
                          "Quantize with slimlm's group_params (zero points in [1, maxq]).")
    return pack_last((z - 1).T, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, offset: int = 1) -> torch.Tensor:
    """`qzeros` int32 [G, out * bits / 32] -> true zero points [out, G] (int64); offset 0 for gptq_v2."""
    return unpack_last(qzeros, bits).T + offset


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, offset: int = 1) -> torch.Tensor:
    """The weight [out, in] (float32) a packed GPTQ layer stands for: the reference for serving kernels."""
    codes = unpack_last(qweight.T, bits)  # [out, in]
    zeros = unpack_qzeros(qzeros, bits, offset)  # [out, G]
    g = g_idx.long()
    return dequantize_codes(codes, scales.T[:, g], zeros[:, g])  # [out, in]


def packed_bits(qweight: torch.Tensor, in_features: int) -> int | None:
    """The bits of a packed `qweight` [in * bits / 32, out] of `in_features` inputs (4 or 8), or None when its
    shape is neither packing. Read per module: a `dynamic` override may give a module other bits than the config."""
    bits = qweight.shape[0] * 32 // max(in_features, 1)
    return bits if bits in (4, 8) and qweight.shape[0] * 32 == in_features * bits else None


def pack_layer(qw: QuantizedWeight, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The four packed tensors of one quantized linear (without the bias)."""
    return {"qweight": pack_qweight(qw.codes, scheme.bits),
            "qzeros": pack_qzeros(qw.zeros, scheme.bits),
            "scales": qw.scales.T.to(scheme.torch_scale_dtype).contiguous(),  # [G, out], exact
            "g_idx": qw.g_idx.to(torch.int32).clone()}  # own storage: safetensors refuses shared tensors


def quantization_config(scheme: QuantScheme, skipped: list[str] = (), head: QuantScheme | None = None,
                        quantized: list[str] = ()) -> dict:
    """The `quantization_config` written to config.json.

    Linears inside the decoder layers that a skip pattern kept in full precision are listed under
    gptqmodel's `dynamic` key as negative matches (`"-:<regex>"`), which vLLM and gptqmodel honour, and
    the `quantized` ones (the LM head too, if quantized) under `modules_in_block_to_quantize`, which
    transformers (through optimum) needs to leave the others dense, and vLLM reads instead of scanning
    the weight files for packed tensors.
    A quantized LM head (`head`: its scheme) sets `lm_head: true`; where its bits or group size differ
    from the body's, a positive match `"+:^lm_head$"` gives them (vLLM applies such overrides per module).
    """
    config = {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
              "desc_act": scheme.act_order, "static_groups": scheme.static_groups, "sym": scheme.sym,
              "true_sequential": True, "lm_head": head is not None, "checkpoint_format": "gptq"}
    dynamic = {f"-:^{re.escape(name)}$": {} for name in skipped}
    if head is not None and (head.bits, head.group_size) != (scheme.bits, scheme.group_size):
        dynamic[f"+:^{HEAD_NAME}$"] = {"bits": head.bits, "group_size": head.group_size}
    if dynamic:
        config["dynamic"] = dynamic
    if skipped and quantized:
        config["modules_in_block_to_quantize"] = [sorted(set(quantized) - {HEAD_NAME})
                                                  + ([HEAD_NAME] if head is not None else [])]
    return config


def gptq_state_dict(model, quantized_state: dict[str, QuantizedWeight], scheme: QuantScheme,
                    head: QuantScheme | None = None) -> dict:
    """The model's state dict with each quantized linear's `weight` replaced by its packed tensors and
    every other float tensor cast to the scale dtype (tied tensors stay tied). The LM head, if quantized,
    packs at `head`'s bits."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, qw in quantized_state.items():
        weight = state.pop(f"{name}.weight", None)
        if weight is None:
            raise SlimlmError(f"quantized layer {name} is not a module of this model.")
        if tuple(weight.shape) != qw.shape:
            raise SlimlmError(f"quantized layer {name} has shape {qw.shape}, the model's weight {tuple(weight.shape)}.")
        for key, tensor in pack_layer(qw, head if name == HEAD_NAME and head is not None else scheme).items():
            out[f"{name}.{key}"] = tensor
    cast: dict = {}  # storage -> cast tensor, so tied weights stay one tensor
    for key, tensor in state.items():
        if tensor.is_floating_point():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in cast:
                cast[ptr] = tensor.detach().to(scheme.torch_scale_dtype).contiguous()
            tensor = cast[ptr]
        out[key] = tensor
    return out


def save_gptq(model, tokenizer, quantized_state: dict[str, QuantizedWeight], scheme: QuantScheme,
              out_dir: str | os.PathLike, meta: dict | None = None, overwrite: bool = False,
              lm_head_scheme: QuantScheme | None = None) -> Path:
    """Write a GPTQ checkpoint that is also a slimlm export (manifest with sha256 of every tensor file).

    `quantized_state` is `quantize_model`'s result, plus `lm_head`'s codes when the head was quantized
    (`lm_head.quantize_lm_head`) with `lm_head_scheme`; `meta` is `toolkit.export.write`'s meta (its
    `transforms.quant` is merged over the scheme's description). Returns the folder's absolute path.
    """
    from ..export import write
    from .calibrate import decoder_layers

    if (HEAD_NAME in quantized_state) != (lm_head_scheme is not None):
        raise SlimlmError(f"a quantized {HEAD_NAME} and its scheme go together: the state "
                          f"{'has' if HEAD_NAME in quantized_state else 'lacks'} {HEAD_NAME}, the scheme is "
                          f"{'given' if lm_head_scheme is not None else 'missing'}.")
    prefix, _ = decoder_layers(model)
    skipped = sorted(name for name, module in model.named_modules()
                     if name.startswith(prefix + ".") and isinstance(module, torch.nn.Linear)
                     and name not in quantized_state)
    qconfig = quantization_config(scheme, skipped, lm_head_scheme, list(quantized_state))
    state = gptq_state_dict(model, quantized_state, scheme, lm_head_scheme)
    meta = dict(meta or {})
    transforms = dict(meta.get("transforms") or {})
    transforms["quant"] = {"format": "gptq", "checkpoint_format": "gptq", **scheme.to_dict(),
                           "lm_head": lm_head_scheme.to_dict() if lm_head_scheme is not None else None,
                           "quantized_modules": len(quantized_state), **(transforms.get("quant") or {})}
    meta["transforms"] = transforms
    original = model.save_pretrained

    # `write` saves through `model.save_pretrained`; this stand-in saves the packed state dict instead
    # and records the quantization in config.json, inside write's temporary folder (so atomically).
    def save_packed(directory, **kwargs):
        original(directory, state_dict=state, **kwargs)
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["quantization_config"] = qconfig
        config["dtype"] = config["torch_dtype"] = scheme.scale_dtype
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    model.save_pretrained = save_packed
    try:
        return write(model, tokenizer, out_dir, meta=meta, overwrite=overwrite)
    finally:
        del model.save_pretrained


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SlimlmError(f"cannot read {path} ({err}).", "Pass a GPTQ checkpoint folder.") from err
    if not isinstance(data, dict):
        raise SlimlmError(f"{path} holds no JSON object.", "Pass a GPTQ checkpoint folder.")
    return data


def find_gptq_config(path: str | os.PathLike) -> dict | None:
    """The GPTQ settings of the folder at `path`, or None: config.json's `quantization_config`, or else
    `quantize_config.json` (AutoGPTQ's layout, which older checkpoints keep; it may name no method)."""
    folder = Path(path)
    qc = _read_json(folder / "config.json").get("quantization_config")
    if qc is None and (folder / "quantize_config.json").is_file():
        qc = {"quant_method": "gptq", **_read_json(folder / "quantize_config.json")}
    return qc if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq" else None


def gptq_config(path: str | os.PathLike) -> dict:
    """The `quantization_config` of the checkpoint at `path` (`find_gptq_config`); SlimlmError unless it is GPTQ,
    or where a slimlm export's config no longer says what its manifest recorded (edited after export)."""
    qc = find_gptq_config(path)
    if qc is None:
        raise SlimlmError(f"{path} is not a GPTQ checkpoint (config.json has no gptq quantization_config).",
                          "Pass a folder written by `slimlm quantize` or another GPTQ tool.")
    if qc.get("is_marlin_format"):  # AutoGPTQ's Marlin repacking (`.B`/`.s` tensors), not GPTQ's own layout
        raise SlimlmError(f"{path}: Marlin-packed GPTQ (is_marlin_format) is not supported.",
                          "Use the plain GPTQ checkpoint the Marlin one was made from (qweight/qzeros/scales/g_idx).")
    if qc.get("bits") not in (2, 3, 4, 8) or qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise SlimlmError(f"{path}: unsupported GPTQ config (bits={qc.get('bits')}, "
                          f"checkpoint_format={qc.get('checkpoint_format')}).",
                          "slimlm reads 4- and 8-bit GPTQ checkpoints in the gptq (v1) or gptq_v2 format.")
    if qc["bits"] not in (4, 8):
        raise SlimlmError(f"{path}: {qc['bits']}-bit GPTQ is not supported.", "slimlm reads 4- and 8-bit GPTQ.")
    if str(qc.get("pack_dtype") or "int32").removeprefix("torch.") != "int32":
        raise SlimlmError(f"{path}: codes packed in {qc['pack_dtype']} words are not supported.",
                          "slimlm reads GPTQ codes packed in int32 (every tool's default); repack with pack_dtype int32.")
    _check_against_manifest(Path(path), qc)
    return qc


def _check_against_manifest(folder: Path, qc: dict) -> None:
    """A slimlm export records its scheme in the manifest. Its config.json is hashed too, except in manifests
    written before it was: there, an edit of config.json that changes how the codes are read (format, bits,
    group size) is refused here."""
    manifest = folder / "slimlm.json"
    if not manifest.is_file():
        return
    quant = (_read_json(manifest).get("transforms") or {}).get("quant") or {}
    if quant.get("format") != "gptq":
        return
    recorded = {"checkpoint_format": quant.get("checkpoint_format", "gptq"), "bits": quant.get("bits"),
                "group_size": quant.get("group_size"), "sym": quant.get("sym"), "desc_act": quant.get("act_order")}
    found = {k: qc.get(k, "gptq" if k == "checkpoint_format" else None) for k in recorded}
    changed = [f"{k}: {found[k]!r} where the manifest says {v!r}" for k, v in recorded.items()
               if v is not None and found[k] != v]
    if changed:
        raise SlimlmError(f"{folder / 'config.json'}'s quantization_config was changed after export ("
                          + "; ".join(changed) + "): the packed weights would be read wrongly.",
                          "Restore config.json from the export, or export the model again.")


def check_layer(folder, name: str, layer: dict[str, torch.Tensor], bits: int | None = None) -> int:
    """The bits of one packed layer `{qweight, qzeros, scales, g_idx}` after checking that its four tensors
    fit together (SlimlmError naming the layer otherwise, where indexing would fail or read garbage)."""
    redo = "The checkpoint is damaged or not GPTQ as slimlm reads it; re-export or re-download it."
    missing = [p for p in PACKED if p not in layer]
    if missing:
        raise SlimlmError(f"{folder}: layer {name} lacks {', '.join(missing)}.", redo)
    qweight, qzeros, scales, g_idx = (layer[p] for p in PACKED)
    words = [f"{p} is {layer[p].dtype}" for p in ("qweight", "qzeros")
             if layer[p].dtype not in (torch.int32, torch.uint32, torch.int64)]
    if words:  # the same bits under another label, or 16-bit words: read as int32 words they would be garbage
        raise SlimlmError(f"{folder}: layer {name}'s {' and '.join(words)}; packed GPTQ codes are 32-bit integer "
                          "words.", redo)
    if g_idx.dim() != 1 or qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise SlimlmError(f"{folder}: layer {name} has tensors of the wrong rank (qweight {tuple(qweight.shape)}, "
                          f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}).", redo)
    bits = bits or packed_bits(qweight, g_idx.numel())
    if bits is None:
        raise SlimlmError(f"{folder}: {name}.qweight {tuple(qweight.shape)} is not a 4- or 8-bit packing of "
                          f"{g_idx.numel()} inputs.", redo)
    out, groups = qweight.shape[1], scales.shape[0]
    if scales.shape[1] != out or qzeros.shape[1] != out * bits // 32:
        raise SlimlmError(f"{folder}: {name} has scales {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)}, "
                          f"expected [groups, {out}] and [groups, {out * bits // 32}] for a {bits}-bit layer of "
                          f"{out} outputs.", redo)
    if qzeros.shape[0] != groups:
        raise SlimlmError(f"{folder}: {name} has {groups} groups of scales but {qzeros.shape[0]} of qzeros.", redo)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise SlimlmError(f"{folder}: {name}.g_idx names groups {int(g_idx.min())}..{int(g_idx.max())}, but the "
                          f"layer has {groups} groups of scales.", redo)
    return bits


def module_setting(qc: dict, name: str, key: str):
    """`qc[key]` for module `name`, or what a `dynamic` override gives it there, read as vLLM reads gptqmodel's
    key: the first pattern that matches the name from its start decides (`-:<regex>` leaves the module out,
    `+:<regex>` or a bare regex overrides the keys it names)."""
    for pattern, override in (qc.get("dynamic") or {}).items():
        if re.match(pattern[2:] if pattern.startswith(("+:", "-:")) else pattern, name):
            if pattern.startswith("-:") or not isinstance(override, dict):
                break
            return override.get(key, qc.get(key))
    return qc.get(key)


def packed_layer(folder, tensors: dict[str, torch.Tensor], name: str, qc: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Layer `name`'s packed tensors and bits, checked (`check_layer`). Some exports leave `g_idx` out where
    it would say `i // group_size` (no act-order; the module's group size, a `dynamic` override's where one
    matches): it is filled in so, and so is a layer of one group in any order; with act-order and several
    groups the order cannot be known, and it is refused as missing."""
    layer = {p: tensors[f"{name}.{p}"] for p in PACKED if f"{name}.{p}" in tensors}
    qweight, qzeros, scales = layer.get("qweight"), layer.get("qzeros"), layer.get("scales")
    if "g_idx" not in layer and qweight is not None and qzeros is not None and scales is not None \
            and qweight.dim() == 2 and qzeros.dim() == 2 and scales.dim() == 2 and qweight.shape[1]:
        # the layer's own bits and groups (a quantized head may differ from the config's)
        bits = qzeros.shape[1] * 32 // qweight.shape[1]
        bits = bits if bits in (4, 8) else qc["bits"]
        gs, in_f, groups = module_setting(qc, name, "group_size"), qweight.shape[0] * 32 // bits, scales.shape[0]
        act_order = module_setting(qc, name, "desc_act")
        source = "the config's group_size" if gs == qc.get("group_size") else "the group_size of its override in the config's dynamic"
        if groups == 1:
            layer["g_idx"] = torch.zeros(in_f, dtype=torch.int32)
        elif (not act_order or module_setting(qc, name, "static_groups")) \
                and gs and gs > 0 and groups == -(-in_f // gs):  # static groups: consecutive under act-order too
            layer["g_idx"] = torch.arange(in_f, dtype=torch.int32) // gs
        elif act_order:
            raise SlimlmError(f"{folder}: layer {name} lacks g_idx, and its config says act-order (desc_act): "
                              "which inputs each of its groups holds cannot be known without it.",
                              "Re-export or re-download the checkpoint with its g_idx tensors.")
        else:
            raise SlimlmError(f"{folder}: layer {name} lacks g_idx, and its {groups} groups of scales are not "
                              f"{in_f} inputs in groups of {gs} ({source}) either.",
                              "Re-export or re-download the checkpoint with its g_idx tensors.")
    return layer, check_layer(folder, name, layer)


def read_gptq_tensors(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The packed layers of a GPTQ checkpoint, `{module name: {qweight, qzeros, scales, g_idx[, bias]}}`,
    as stored (for the serving kernels; a left-out `g_idx` filled in, `packed_layer`); `gptq_config(path)`
    gives bits and group size."""
    qc = gptq_config(path)
    tensors = _read_safetensors(Path(path))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            layers[name] = packed_layer(path, tensors, name, qc)[0]
            if f"{name}.bias" in tensors:
                layers[name]["bias"] = tensors[f"{name}.bias"]
    return layers


def load_gptq(path: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load a GPTQ checkpoint as `(model with dequantized weights in dtype, tokenizer)`.

    A slimlm export is verified first (sha256 of every tensor file; `verify=False` skips that for a
    caller that just did it). GPTQ folders from other tools load too. The model is a plain HF model
    with no quantizer attached, so every tool that takes a model (eval, serve, compare) can use it;
    its attribute `slimlm_gptq_dir` (GPTQ_DIR_ATTR) names the folder, for serving the packed codes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..export import is_export, read

    folder = Path(path)
    if verify and is_export(folder):
        read(folder)
    qc = gptq_config(folder)
    offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1
    tensors = _read_safetensors(folder)
    state = {}
    for key, tensor in tensors.items():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            layer, bits = packed_layer(folder, tensors, name, qc)
            state[f"{name}.weight"] = dequantize_gptq(*(layer[p] for p in PACKED), bits, offset).to(dtype)
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "tie_word_embeddings", False) and "lm_head.qweight" in tensors:
        raise SlimlmError(f"{folder}: config.json ties the LM head to the input embeddings, but the checkpoint holds "
                          "a quantized lm_head of its own: which of the two is the model's head is ambiguous.",
                          "Set \"tie_word_embeddings\": false in config.json to use the quantized head (slimlm writes "
                          "it so), or remove the lm_head tensors to use the embeddings.")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _drop_zero_biases(folder, model, state, tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise SlimlmError(f"{folder} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}.", "Re-export the checkpoint.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Where the packed codes are: slimlm's serving engine reads them from here and runs its int4/int8
    # kernels instead of the dense weights above (`serve/models/gptq_weights.py`).
    setattr(model, GPTQ_DIR_ATTR, str(folder.resolve()))
    return model.eval(), tokenizer


def _drop_zero_biases(folder: Path, model, state: dict, tensors: dict) -> None:
    """Older GPTQ tools (GPTQ-for-LLaMa, early AutoGPTQ) save an all-zero `bias` beside every packed layer, also
    where the model has none; those change nothing and are dropped, as vLLM drops them. A nonzero one is refused:
    the config would have to say the model has biases."""
    for key in [k for k in state if k.endswith(".bias") and f"{k[:-len('.bias')]}.qweight" in tensors]:
        try:
            module = model.get_submodule(key[:-len(".bias")])
        except AttributeError:
            continue  # not a layer of this model: the unexpected-weights refusal names it
        if getattr(module, "bias", None) is not None:
            continue
        if torch.count_nonzero(state[key]):
            raise SlimlmError(f"{folder}: {key} holds a nonzero bias, but config.json builds that layer without one.",
                              "Set the config's bias option (e.g. attention_bias / mlp_bias: true) to match the "
                              "checkpoint.")
        del state[key]


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif not (folder / "model.safetensors").is_file() and len(found) == 1:
        files = found  # AutoGPTQ names its one file after the scheme (model_file_base_name)
    elif not (folder / "model.safetensors").is_file() and found:
        raise SlimlmError(f"{folder} holds {len(found)} .safetensors files ({', '.join(found[:4])}) but no "
                          "model.safetensors.index.json to say which tensors each holds.",
                          "Add the index file the tool wrote with them, or re-download the checkpoint.")
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if not (folder / "model.safetensors").is_file() and pickled:
            raise SlimlmError(f"{folder} holds its weights as {', '.join(pickled[:4])} (pickle), which slimlm does not "
                              "load: unpickling runs code from the file.",
                              "Convert them to .safetensors (torch.load(..., weights_only=True), then "
                              "safetensors.torch.save_file), or use the checkpoint's safetensors release.")
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise SlimlmError(f"{folder / name} is missing.", "Re-export or re-download the checkpoint.")
        tensors.update(load_file(folder / name))
    return tensors
