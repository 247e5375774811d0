"""Importance scores for structured pruning, measured on calibration tokens (higher = keep).

Two ways to score width (attention heads, MLP channels, hidden channels), one for depth:

- `activation` (Minitron): how large a structure's output is on real text. A head scores the L2 norm of
  its attention output before `o_proj` (`[B, T, H, D]` -> `[B, T, H]`), an MLP channel `|act(gate) * up|`
  (the input of `down_proj`), a hidden channel `|x|` summed over every place the residual stream is read
  out: the embedding output, every RMSNorm output (input/post-attention and final). Per sample, values are
  reduced over tokens (`token_agg`: mean or L2), then over samples (`batch_agg`: mean or L2). Minitron's
  ablation found mean over tokens with L2 over the batch best, hence the defaults.
- `taylor`: first-order estimate of the loss change when a weight is zeroed, `|w * dL/dw|` per element,
  summed over every weight that belongs to the structure (a head: its `q_proj` rows and `o_proj` columns;
  a KV group adds its `k_proj`/`v_proj` rows; a hidden channel: every column/row/norm entry on it).
  The gradient is that of the mean next-token loss over all calibration tokens.
- depth, in both modes: block importance `1 - cos(x_in, x_out)` of a decoder layer's input and output
  hidden states, averaged over all tokens (ShortGPT): a layer that barely turns the residual stream does
  little, whatever its weights.

Both modes also record the mean square of every hidden RMSNorm's input per channel (`norm_inputs`), from
which `norm_scales` rescales the norms of a width-pruned model.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SlimlmError
from ..eval._common import model_device, progress_bar
from .structure import head_dim, roles_of, shape_of, split_key

METHODS = ("activation", "taylor")
AGGREGATIONS = ("mean", "l2")


@dataclass
class Importance:
    """Scores of one model on one calibration set (float64, CPU). Higher means more important."""

    heads: torch.Tensor     # [L, n_heads]: per query head
    kv_heads: torch.Tensor  # [L, n_kv]: what a KV group scores beyond its query heads (taylor: k/v rows)
    mlp: torch.Tensor       # [L, intermediate]
    hidden: torch.Tensor    # [hidden]
    layers: torch.Tensor    # [L]: block importance, 1 - cos(in, out)
    method: str
    # Mean square of each hidden norm's input per channel, by weight name ("model.norm.weight": [hidden]);
    # lets `norm_scales` keep RMSNorm outputs at their size when hidden channels go.
    norm_inputs: dict = field(default_factory=dict)

    def groups(self) -> torch.Tensor:
        """Score of each KV group (a KV head with its query heads): `[L, n_kv]`."""
        n_layers, n_heads = self.heads.shape
        n_kv = self.kv_heads.shape[1]
        return self.kv_heads + self.heads.view(n_layers, n_kv, n_heads // n_kv).sum(-1)


class _Reducer:
    """Reduce `[B, T, C]` magnitudes over tokens per sample, then over samples, in a running way."""

    def __init__(self, token_agg: str, batch_agg: str):
        self.token_agg, self.batch_agg = token_agg, batch_agg
        self.total, self.n = None, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()  # x: [B, T, C], non-negative
        per_sample = x.mean(1) if self.token_agg == "mean" else x.pow(2).sum(1).sqrt()  # [B, C]
        part = per_sample.sum(0) if self.batch_agg == "mean" else per_sample.pow(2).sum(0)  # [C]
        self.total = part.cpu() if self.total is None else self.total + part.cpu()
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.total / self.n if self.batch_agg == "mean" else self.total.sqrt()  # [C]


def norm_scales(importance: Importance, hidden: list[int]) -> dict[str, float]:
    """Factor for each hidden RMSNorm weight that keeps its output the same size once only `hidden` remain.

    RMSNorm divides by the root mean square over all channels. Dropping channels changes that root mean
    square: the kept (high-scoring) channels usually carry more than their share of the energy, so the
    pruned norm would divide by more and shrink every output (by up to sqrt(kept / all)) in every layer.
    Multiplying the weight by rms_kept / rms_all, each measured as the calibration mean, undoes the bias.
    """
    idx = torch.tensor(hidden)
    return {name: float((e[idx].mean() / e.mean()).sqrt()) for name, e in importance.norm_inputs.items()}


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def compute_importance(model, samples: torch.Tensor, method: str = "activation", batch_size: int = 8,
                       token_agg: str = "mean", batch_agg: str = "l2", progress: bool = False) -> Importance:
    """Score every prunable structure of `model` on calibration token windows `samples` [N, T].

    `method` is "activation" or "taylor" (see the module doc); `token_agg`/`batch_agg` ("mean" or "l2")
    apply to activation scores. Taylor runs a backward pass and leaves every `.grad` cleared.
    """
    if method not in METHODS:
        raise SlimlmError(f"unknown importance score {method!r}.", f"Expected one of: {', '.join(METHODS)}.")
    for name, agg in (("token_agg", token_agg), ("batch_agg", batch_agg)):
        if agg not in AGGREGATIONS:
            raise SlimlmError(f"unknown {name} {agg!r}.", f"Expected one of: {', '.join(AGGREGATIONS)}.")
    samples = torch.as_tensor(samples, dtype=torch.long)
    if samples.dim() != 2 or samples.numel() == 0 or samples.shape[1] < 2:
        raise SlimlmError(f"calibration samples must be a [N, T] tensor of token ids with T >= 2, "
                          f"got shape {tuple(samples.shape)}.", "Use calibration_samples(...) to make them.")
    if batch_size < 1:
        raise SlimlmError(f"batch size must be at least 1, got {batch_size}.")
    shape = shape_of(model)
    n_layers, d = shape.num_hidden_layers, head_dim(model.config)
    reducers: dict = defaultdict(lambda: _Reducer(token_agg, batch_agg))
    block = torch.zeros(n_layers, dtype=torch.float64)  # summed 1 - cos over tokens
    n_tokens = [0]
    want_acts = method == "activation"
    hooks = []

    def reads(key):  # hidden-channel magnitude of a module's output
        return lambda mod, args, out: reducers[key].add(_output(out).abs())

    def energy(key):  # x: [B, T, H] -> running sum of x^2 per channel and token count
        def hook(mod, args):
            x = args[0].detach().double()
            sq = x.pow(2).sum(dim=(0, 1)).cpu()  # [H]
            energies[key] = energies[key] + sq if key in energies else sq
            counts[key] = counts.get(key, 0) + x.shape[0] * x.shape[1]
        return hook

    def block_hook(i):
        def hook(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            x_out = _output(out)
            cos = F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)  # [B, T]
            block[i] += (1 - cos).double().sum().cpu()
            if i == 0:
                n_tokens[0] += cos.numel()
        return hook

    def head_hook(i):
        def hook(mod, args):
            x = args[0].detach()  # [B, T, n_heads * D]
            reducers[("heads", i)].add(x.view(*x.shape[:-1], -1, d).float().norm(dim=-1))  # [B, T, n_heads]
        return hook

    def mlp_hook(i):
        return lambda mod, args: reducers[("mlp", i)].add(args[0].abs())  # [B, T, I]

    decoder = model.model
    energies, counts = {}, {}
    norms = {f"model.layers.{i}.{n}.weight": getattr(layer, n) for i, layer in enumerate(decoder.layers)
             for n in ("input_layernorm", "post_attention_layernorm")}
    norms["model.norm.weight"] = decoder.norm
    try:
        for key, norm in norms.items():
            hooks.append(norm.register_forward_pre_hook(energy(key)))
        for i, layer in enumerate(decoder.layers):
            hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
            if want_acts:
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
                hooks.append(layer.input_layernorm.register_forward_hook(reads(("hidden", f"in{i}"))))
                hooks.append(layer.post_attention_layernorm.register_forward_hook(reads(("hidden", f"post{i}"))))
        if want_acts:
            hooks.append(decoder.embed_tokens.register_forward_hook(reads(("hidden", "embed"))))
            hooks.append(decoder.norm.register_forward_hook(reads(("hidden", "norm"))))
        _run(model, samples, batch_size, taylor=not want_acts, progress=progress)
    finally:
        for h in hooks:
            h.remove()

    layers = block / max(n_tokens[0], 1)  # [L]
    norm_inputs = {k: energies[k] / counts[k] for k in energies}  # mean x^2 per channel: [H]
    if want_acts:
        heads = torch.stack([reducers[("heads", i)].result() for i in range(n_layers)])  # [L, n_heads]
        mlp = torch.stack([reducers[("mlp", i)].result() for i in range(n_layers)])  # [L, I]
        hidden = sum(r.result() for k, r in reducers.items() if k[0] == "hidden")  # [H]
        kv = torch.zeros(n_layers, shape.num_key_value_heads, dtype=torch.float64)
        return Importance(heads, kv, mlp, hidden, layers, method, norm_inputs)
    scores = _taylor_scores(model, shape, d)
    return Importance(scores["q"], scores["kv"], scores["mlp"], scores["hidden"], layers, method, norm_inputs)


def _run(model, samples, batch_size, taylor, progress):
    device = model_device(model)
    was_training = model.training
    model.eval()
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if taylor:
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
        with progress_bar(progress) as bar, torch.set_grad_enabled(taylor):
            task = bar.add_task(f"importance ({'taylor' if taylor else 'activation'})", total=len(samples))
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size].to(device)  # [B, T]
                if taylor:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    # Weighted by this batch's share of tokens, so the sum is the gradient of the overall mean.
                    (loss * batch.shape[0] / len(samples)).backward()
                else:  # activations need no logits: skip the LM head, often the largest matmul
                    model.model(input_ids=batch, use_cache=False)
                bar.advance(task, batch.shape[0])
    finally:
        model.train(was_training)
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)


def _taylor_scores(model, shape, d) -> dict:
    n_layers = shape.num_hidden_layers
    out = {"q": torch.zeros(n_layers, shape.num_attention_heads, dtype=torch.float64),
           "kv": torch.zeros(n_layers, shape.num_key_value_heads, dtype=torch.float64),
           "mlp": torch.zeros(n_layers, shape.intermediate_size, dtype=torch.float64),
           "hidden": torch.zeros(shape.hidden_size, dtype=torch.float64)}
    for name, p in model.named_parameters():  # deduplicated: a tied embedding is scored once
        if p.grad is None:
            continue
        s = (p.detach().double() * p.grad.double()).abs().cpu()  # per-element first-order loss change
        layer, _ = split_key(name)
        for dim, role in enumerate(roles_of(name)):
            if role is None:
                continue
            other = [k for k in range(s.dim()) if k != dim]
            v = s.sum(dim=other) if other else s  # [size of this axis]
            if role == "hidden":
                out["hidden"] += v
            elif role == "mlp":
                out["mlp"][layer] += v
            else:  # q or kv rows: head_dim rows per head
                out[role][layer] += v.view(-1, d).sum(-1)
        p.grad = None
    return out
