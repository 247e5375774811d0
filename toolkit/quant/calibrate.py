"""Quantize a whole model: RTN directly, or GPTQ layer by layer on calibration samples.

GPTQ needs each linear layer's inputs as the *quantized* model would produce them, so the decoder
layers are calibrated in order and each one's outputs (computed with its freshly quantized weights)
become the next one's inputs:

1. The samples run through the embeddings only: a hook on the first decoder layer records its inputs
   (hidden states and the attention kwargs the model built: position embeddings, mask) and stops the
   forward pass with an exception, so nothing past layer 0 is computed.
2. Inside a layer, true-sequential order, one stage per group of linears that share an input:
   q/k/v (input norm output) -> o_proj (attention output) -> gate/up (post-attention norm output)
   -> down_proj (the MLP's gated activation). Each stage accumulates one Hessian for its group,
   quantizes the group's stacked weight in one GPTQ call (one Cholesky factorisation for q, k and v),
   and writes the dequantized weights back before the next stage computes its inputs.
   The stages resume from stored intermediate tensors (attention output, residual after attention,
   MLP activation), so each layer costs about one forward pass plus its Hessians, not one per stage.
   The stages follow the Llama/Qwen2/Qwen3/Mistral layer (pre-norm attention and gated MLP, each
   added to the residual); every layer is first checked against its own `forward` on one sample and
   refused if it computes something else.

Precision: the calibration forward passes run in `compute_dtype` (bf16 by default: ~3x the float32
matmul speed on AVX-512 BF16 CPUs; `slimlm quantize` picks float32 on CPUs without native bf16, see
`default_compute_dtype`) on a bf16 copy of one layer at a time. Hessian products run in
bf16 too (unless `hessian_dtype="float32"`), summed in float32; a stage whose bf16 Hessian is not positive definite
(rounding, on rank-deficient inputs such as GQA attention outputs) gets it rebuilt in float32 from the
stage inputs, which are still held then (see `Hessian`). GPTQ itself, the model's weights and the
results stay float32.

Peak memory: the model (float32) plus one layer's calibration activations in bf16, at most
`n_samples * seq_len * (hidden + intermediate) * 2 bytes` held at once (the residual stream beside
the MLP activation; SmolLM2-135M with 128 x 512 tokens: 0.28 GB), plus one chunk's transient forward
tensors (`batch_tokens`), one layer's bf16 copy and its Hessians (`in^2 * 4` bytes each, <= 10 MB).
Measured by `scripts/quant_ppl.py` (ru_maxrss, SmolLM2-135M, 128 x 512): 1.74-1.81 GB at the end of
GPTQ, against 1.0 GB for the same process quantizing with RTN (model load and runtime alone), so
calibration adds ~0.75 GB: the activations above plus per-chunk transients and allocator slack.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from ..errors import SlimlmError
from ..eval._common import eval_mode, progress_bar
from .gptq import Hessian, NotPositiveDefinite, gptq_quantize
from .qweight import QuantizedWeight
from .rtn import rtn_quantize
from .scheme import QuantScheme

# (input of the group, linears sharing it), in the order true-sequential quantization visits them.
STAGES = (("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("attn_out", ("self_attn.o_proj",)),
          ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp_act", ("mlp.down_proj",)))
KNOWN_LINEARS = {name for _, names in STAGES for name in names}
METHODS = ("gptq", "rtn")


class _Stop(Exception):
    """Raised by a hook once the tensor it waited for is captured, to skip the rest of a forward."""


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """`(qualified name, layers)` of the decoder layer list of a HF causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SlimlmError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers).",
                          "Quantization supports Llama-style causal LMs (Llama, Qwen2, Qwen3, Mistral, SmolLM2).")
    return "model.layers", layers


def target_linears(model, scheme: QuantScheme) -> dict[str, nn.Linear]:
    """The linears to quantize, `{qualified name: module}`: every `nn.Linear` in a decoder layer that no
    skip pattern matches, each checked against the scheme (SlimlmError names a layer that does not fit)."""
    prefix, layers = decoder_layers(model)
    found = {}
    for i, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            name = f"{prefix}.{i}.{sub}"
            if isinstance(module, nn.Linear) and not scheme.is_skipped(name):
                scheme.check_layer(name, module.out_features, module.in_features)
                found[name] = module
    if not found:
        raise SlimlmError("no linear layer is left to quantize (all matched a skip pattern).",
                          f"Skip patterns in use: {', '.join(scheme.skip) or 'none'}.")
    return found


# Linears that serving engines fuse into one (qkv_proj, gate_up_proj): one precision for all of a group.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def split_fused_groups(model, quantized) -> list[str]:
    """The linears kept dense beside quantized ones of the same fused group (q/k/v, gate/up) under one parent
    module, e.g. `model.layers.1.self_attn.k_proj`: slimlm serves such a mix (the fused layer runs dense), but
    vLLM and SGLang refuse a group whose shards differ ("some but not all shards ... are quantized"), and TGI
    needs every shard packed."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        for g, group in enumerate(FUSED_GROUPS):
            if isinstance(module, nn.Linear) and leaf in group:
                groups.setdefault((parent, g), []).append(name)
    quantized = set(quantized)
    return sorted(n for names in groups.values() if 0 < len(set(names) & quantized) < len(names)
                  for n in names if n not in quantized)


def default_compute_dtype(device: torch.device | str = "cpu", cpu_flags: set[str] | None = None) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA, or a CPU with AVX512_BF16 or AMX-BF16), else
    float32: on an AVX2 CPU bf16 matmuls are emulated, several times slower than float32 ones.
    `cpu_flags`: the CPU's flags as /proc/cpuinfo names them (default: this CPU's, `toolkit.cpu.cpu_flags`)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if cpu_flags is None:
        from slimlm.toolkit.cpu import cpu_flags as read_flags
        cpu_flags = read_flags()
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(cpu_flags) else torch.float32


def quantize_model(model, scheme: QuantScheme, method: str = "gptq", samples: torch.Tensor | None = None, *,
                   batch_tokens: int = 8192, damp: float = 0.01, block_size: int = 128,
                   compute_dtype: torch.dtype = torch.bfloat16, hessian_dtype: str | None = None,
                   progress: bool = True, stats: dict | None = None) -> dict[str, QuantizedWeight]:
    """Quantize `model`'s decoder linears in place; return `{qualified name: QuantizedWeight}`.

    Afterwards the model holds the dequantized weights (float32), so it can be evaluated at once and
    equals what `load_gptq` reads back from the checkpoint.

    Args:
        model: a HF causal LM with `model.model.layers` (Llama, Qwen2, Qwen3, Mistral, SmolLM2).
        scheme: the quantization scheme (see `QuantScheme`).
        method: "gptq" (needs `samples`) or "rtn".
        samples: calibration token ids `[n, T]` (see `slimlm.toolkit.data.calibration_samples`).
        batch_tokens: tokens per forward pass while calibrating (memory vs. speed).
        damp: GPTQ dampening, fraction of mean(diag H).
        block_size: GPTQ lazy-update block.
        compute_dtype: dtype of the calibration forward passes (bf16 or float32).
        hessian_dtype: precision of the Hessian products `X^T X`: "bf16" (each chunk's sum rounded
            once, see `Hessian`) or "float32" (bf16 activations cast up first: exact products, ~2.5x the
            time of bf16 ones on an AVX-512 BF16 CPU); None: that of `compute_dtype`. With a float32
            `compute_dtype` every product is float32. On SmolLM2 GPTQ int4 g64 the two precisions
            differ by less than two calibration draws do (docs/benchmarks.md), so bf16 is the default.
        progress: show a rich progress bar (one step per decoder layer).
        stats: if given (GPTQ), filled with `{name: {"rel_output_error", "hessian", "seconds"}}`: the
            output error `||X (W - Q)^T|| / ||X W^T||` on the calibration inputs, the precision the
            Hessian ended up in ("bf16" or "float32"), and the GPTQ time of the module's group.
    """
    if method not in METHODS:
        raise SlimlmError(f"unknown quantization method {method!r}.", f"Expected one of: {', '.join(METHODS)}.")
    targets = target_linears(model, scheme)
    if method == "rtn":
        result = {}
        with torch.no_grad():
            for name, module in targets.items():
                result[name] = rtn_quantize(module.weight, scheme)
                module.weight.copy_(result[name].dequantize().to(module.weight.dtype))
        return result
    if compute_dtype not in (torch.bfloat16, torch.float32):
        raise SlimlmError(f"calibration compute dtype must be bfloat16 or float32, got {compute_dtype}.")
    if hessian_dtype not in (None, "bf16", "float32"):
        raise SlimlmError(f"unknown Hessian precision {hessian_dtype!r}.", "Expected bf16 or float32.")
    fast = (hessian_dtype or ("bf16" if compute_dtype == torch.bfloat16 else "float32")) == "bf16"
    samples = _check_samples(samples, model.get_input_embeddings().num_embeddings)
    prefix, layers = decoder_layers(model)
    per_chunk = max(1, batch_tokens // samples.shape[1])
    result: dict[str, QuantizedWeight] = {}
    with torch.no_grad(), eval_mode(model), progress_bar(progress) as bar:  # eval: no dropout
        task = bar.add_task("GPTQ: embeddings", total=len(layers))
        xs, kws = _first_layer_inputs(model, layers[0], samples.split(per_chunk), compute_dtype)
        _, probe_kw = _first_layer_inputs(model, layers[0], [samples[:1]], compute_dtype)
        for i, layer in enumerate(layers):
            mine = {n[len(f"{prefix}.{i}."):]: m for n, m in targets.items() if n.startswith(f"{prefix}.{i}.")}
            unknown = sorted(set(mine) - KNOWN_LINEARS)
            if unknown:
                raise SlimlmError(f"layer {prefix}.{i} has linear(s) GPTQ calibration does not know: "
                                  f"{', '.join(unknown)}.",
                                  "Skip them with skip patterns, or use --method rtn.")
            work = copy.deepcopy(layer).to(compute_dtype).eval()  # the copy the activations run through
            _check_structure(work, xs[0][:1], probe_kw[0], f"{prefix}.{i}")
            label = f"GPTQ layer {i + 1}/{len(layers)}"
            bar.update(task, description=label)

            def quantize(names, H, exact, layer=layer, work=work, i=i, mine=mine, label=label):
                names = [n for n in names if n in mine]
                if names:
                    bar.update(task, description=f"{label}: {', '.join(n.split('.')[-1] for n in names)}")
                    _quantize_group(layer, work, names, H, exact, scheme, damp, block_size,
                                    f"{prefix}.{i}", result, stats)

            xs = _calibrate_layer(work, xs, kws, {n for n in mine}, quantize, fast)
            bar.advance(task)
    return result


def _check_samples(samples, vocab: int) -> torch.Tensor:
    if samples is None:
        raise SlimlmError("GPTQ needs calibration samples.",
                          "Pass samples from slimlm.toolkit.data.calibration_samples, or use method='rtn'.")
    samples = torch.as_tensor(samples)
    if samples.dim() != 2 or samples.numel() == 0 or samples.dtype not in (torch.int64, torch.int32):
        raise SlimlmError(f"calibration samples must be token ids [n, T], got {tuple(samples.shape)} {samples.dtype}.")
    if samples.min() < 0 or samples.max() >= vocab:
        raise SlimlmError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary), got "
                          f"{int(samples.min())}..{int(samples.max())}.",
                          "Tokenize the calibration text with the model's own tokenizer.")
    return samples.long()


def _first_layer_inputs(model, first_layer, chunks, dtype):
    """Run each chunk of token ids through the embeddings; return the first layer's inputs.

    Returns `(hidden states per chunk [b, T, D] in dtype, layer kwargs per chunk)`; floating tensors in
    the kwargs (rotary cos/sin, additive masks) are cast to dtype as well.
    """
    got = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.append((hidden.to(dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}))
        raise _Stop

    device = next(model.parameters()).device
    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in chunks:
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return [h for h, _ in got], [kw for _, kw in got]


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _input_of(module: nn.Module, run) -> torch.Tensor:
    """The input `module` receives while `run()` executes; the forward stops right there."""
    seen = []

    def hook(mod, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise SlimlmError(f"calibration never reached {type(module).__name__}; the layer's structure is not supported.")
    return seen[0]


def _calibrate_layer(work, xs, kws, mine: set, quantize, fast: bool = True):
    """Run the stages of one decoder layer over all chunks; return the layer's outputs per chunk.

    `quantize(names, hessian, exact)` quantizes the named linears (those of them in `mine`) and
    updates `work`'s weights, so each later stage sees the quantized ones; `exact()` rebuilds the
    stage's Hessian in float32 from the stage inputs, which are still held at that point. Lists are
    overwritten in place as their tensors stop being needed: at most ~2 activations per chunk live.
    `fast` False: the Hessians form float32 products from the start (bf16 inputs are cast up).
    """
    attn, mlp = work.self_attn, work.mlp
    hessians = {key: Hessian(_width(work, names[0]), fast=fast)
                for key, names in STAGES if any(n in mine for n in names)}

    def add(key, x):
        if key in hessians:
            hessians[key].add(x)

    def stage_done(index, inputs):
        key, names = STAGES[index]
        if key in hessians:
            quantize(names, hessians.pop(key), lambda: _exact_hessian(inputs(), _width(work, names[0])))

    for x in xs:
        add("attn_in", work.input_layernorm(x))  # [b, T, D]
    stage_done(0, lambda: (work.input_layernorm(x) for x in xs))

    attn_in = []  # o_proj inputs per chunk, [b, T, heads * head_dim]
    for x, kw in zip(xs, kws):
        attn_in.append(_attention_output(work, x, kw))
        add("attn_out", attn_in[-1])
    stage_done(1, lambda: attn_in)

    for j in range(len(xs)):
        xs[j] = xs[j] + attn.o_proj(attn_in[j])  # residual after attention, [b, T, D]
        attn_in[j] = None
        add("mlp_in", work.post_attention_layernorm(xs[j]))
    stage_done(2, lambda: (work.post_attention_layernorm(h) for h in xs))

    acts = []  # down_proj inputs per chunk, [b, T, intermediate]
    for h in xs:
        acts.append(_mlp_activation(work, h))
        add("mlp_act", acts[-1])
    stage_done(3, lambda: acts)

    for j in range(len(xs)):
        xs[j] = xs[j] + mlp.down_proj(acts[j])  # the layer's output, [b, T, D]
        acts[j] = None
    return xs


def _exact_hessian(inputs, width: int) -> Hessian:
    H = Hessian(width, fast=False)
    for x in inputs:
        H.add(x)
    return H


def _width(work, name: str) -> int:
    return work.get_submodule(name).in_features


def _attention_output(work, x, kw) -> torch.Tensor:
    """o_proj's input for layer input `x`: the attention output before the projection."""
    attn = work.self_attn
    return _input_of(attn.o_proj, lambda: attn(hidden_states=work.input_layernorm(x), **kw))


def _mlp_activation(work, h) -> torch.Tensor:
    """down_proj's input for the residual `h` after attention: act(gate(.)) * up(.)."""
    return _input_of(work.mlp.down_proj, lambda: work.mlp(work.post_attention_layernorm(h)))


def _staged_forward(work, x, kw) -> torch.Tensor:
    """The layer's output computed the way the stages compute it (no quantization)."""
    h = x + work.self_attn.o_proj(_attention_output(work, x, kw))
    return h + work.mlp.down_proj(_mlp_activation(work, h))


def _quantize_group(layer, work, names, H, exact, scheme, damp, block_size, prefix, result, stats) -> None:
    """GPTQ on the stacked float32 weights of `names` (one shared input Hessian); write back both copies.

    A fast (bf16) Hessian that is not positive definite is rebuilt in float32 by `exact()` first.
    """
    modules = [layer.get_submodule(n) for n in names]
    W = torch.cat([m.weight.float() for m in modules])  # [sum(out), in]
    start = time.perf_counter()
    try:
        qw = gptq_quantize(W, H.matrix(), scheme, damp=damp, block_size=block_size, escalate=False)
    except NotPositiveDefinite:
        H = exact()
        qw = gptq_quantize(W, H.matrix(), scheme, damp=damp, block_size=block_size)
    deq = qw.dequantize()  # [sum(out), in]
    Hm = H.matrix() if stats is not None else None
    row = 0
    for name, module in zip(names, modules):
        rows = module.out_features
        result[f"{prefix}.{name}"] = qw.rows(row, row + rows)
        module.weight.copy_(deq[row:row + rows].to(module.weight.dtype))
        work.get_submodule(name).weight.copy_(deq[row:row + rows].to(work.get_submodule(name).weight.dtype))
        if stats is not None:
            Wr, D = W[row:row + rows], W[row:row + rows] - deq[row:row + rows]  # [rows, in]
            num, den = ((D @ Hm) * D).sum(), ((Wr @ Hm) * Wr).sum()
            stats[f"{prefix}.{name}"] = {"rel_output_error": (num / den).sqrt().item() if den > 0 else 0.0,
                                         "hessian": "bf16" if H.rounded else "float32",
                                         "seconds": time.perf_counter() - start}
        row += rows


def _check_structure(work, x, kw, name: str) -> None:
    """Refuse a layer whose own forward differs from the staged computation (on one sample)."""
    out = work(x, **kw)
    out = out[0] if isinstance(out, tuple) else out  # [1, T, D]
    staged = _staged_forward(work, x, kw)  # [1, T, D]
    tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-4
    if not torch.allclose(out.float(), staged.float(), rtol=tol, atol=tol * (out.abs().max().item() + 1e-6)):
        raise SlimlmError(f"decoder layer {name} ({type(work).__name__}) does not compute "
                          "x + o_proj(attention(norm(x))), then + down_proj(mlp activation(norm(.))), "
                          "which GPTQ calibration relies on.",
                          "Use --method rtn for this architecture.")
