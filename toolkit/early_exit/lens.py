"""Fitting lens exits by least squares: the affine map from an exit's normed state to the final one.

A lens exit (`ExitHeads(..., norm="lens")`) computes `lm_head(n + proj_E(n))` with n = norm_E(h_E). With
the model's weights left as they are, the map that makes exit E agree most with the final layer is, to a
first approximation, the one that predicts what the LM head reads from the last layer, final_norm(h_L),
from n. `fit_lenses` finds it in closed form: ridge regression of final_norm(h_L) on [n, 1] over the
positions of some training blocks, the normal equations summed batch by batch in float64 (memory: two
[D+1, D+1] and [D+1, D] matrices per exit, whatever the number of tokens), then
`proj_E.weight = (A - I)^T`, `proj_E.bias = b` for the solution `final_norm(h_L) ~ n A + b`.

Normalising first matters: the fit then spends nothing on each token's scale (the first token's state
is hundreds of times larger than the others'). On SmolLM2-135M (32,768 train-split tokens, ridge 1e-2;
the first 16 validation windows of 512 tokens) the greedy agreement of exits 4 / 8 / 16 / 20 with the
final layer goes from 0.058 / 0.060 / 0.117 / 0.164 through the shared final norm to 0.243 / 0.257 /
0.315 / 0.378; the same fit before the norm reached 0.235 / 0.250 / 0.238 / 0.314.
"""
from __future__ import annotations

import torch

from ..errors import SlimlmError
from ..eval._common import eval_mode, model_device, progress_bar
from .heads import ExitHeads, capture_hidden, decoder_layers, final_norm


def lens_normal_equations(model, exits: ExitHeads, blocks: torch.Tensor, batch_size: int = 4,
                          progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{E: (X^T X [D+1, D+1], X^T Y [D+1, D])}` in float64 with X = [norm_E(h_E), 1] and
    Y = final_norm(h_L), over every position of `blocks` [N, T] (token ids)."""
    num_layers = len(decoder_layers(model))
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise SlimlmError(f"lens fitting needs token blocks [N, T], got shape {tuple(blocks.shape)}.")
    device, last = model_device(model), final_norm(model)
    sums: dict[int, list[torch.Tensor]] = {}
    with eval_mode(model), torch.inference_mode(), capture_hidden(model, [*exits.layers, num_layers]) as hidden, \
            progress_bar(progress) as bar:
        task = bar.add_task("fitting lens exits", total=len(blocks))
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
            y = last(hidden[num_layers])
            y = y.reshape(-1, y.size(-1)).double()  # [B*T, D]
            for e in exits.layers:
                n = exits.exits[str(e)].norm(hidden[e]).reshape(-1, y.size(-1)).double()
                x = torch.cat([n, torch.ones(len(n), 1, dtype=n.dtype, device=n.device)], 1)  # [B*T, D+1]
                xtx, xty = x.T @ x, x.T @ y
                if e in sums:
                    sums[e][0] += xtx
                    sums[e][1] += xty
                else:
                    sums[e] = [xtx, xty]
            bar.update(task, advance=min(batch_size, len(blocks) - start))
    return {e: (xtx.cpu(), xty.cpu()) for e, (xtx, xty) in sums.items()}


def solve_lens(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight [D, D], bias [D])` of proj for `Y ~ X A + b`, with `ridge` times the mean diagonal of
    X^T X added to its diagonal (the bias row included)."""
    if ridge < 0:
        raise SlimlmError(f"lens ridge must be >= 0, got {ridge}.")
    d = xtx.size(0) - 1
    lam = ridge * xtx.diagonal().mean()
    solution = torch.linalg.solve(xtx + lam * torch.eye(d + 1, dtype=xtx.dtype), xty)  # [D+1, D]
    weight = (solution[:d] - torch.eye(d, dtype=xtx.dtype)).T
    return weight, solution[d]


def fit_lenses(model, exits: ExitHeads, blocks: torch.Tensor, ridge: float = 1e-2, batch_size: int = 4,
               progress: bool = True) -> None:
    """Set every lens exit's `proj` to the least-squares map from norm_E(h_E) to final_norm(h_L) over the
    positions of `blocks` [N, T] (the exits' norms as they are)."""
    if exits.norm_kind != "lens":
        raise SlimlmError(f"fit_lenses needs lens exits, got norm={exits.norm_kind!r}.")
    sums = lens_normal_equations(model, exits, blocks, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        for e, (xtx, xty) in sums.items():
            weight, bias = solve_lens(xtx, xty, ridge)
            proj = exits.exits[str(e)].proj
            proj.weight.copy_(weight.to(proj.weight))
            proj.bias.copy_(bias.to(proj.bias))
