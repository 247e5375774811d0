"""Early exits: logits after chosen decoder layers, trained so that a model can stop early.

The format, for the serving side (self-speculative decoding drafts with the first E layers + exit E):
- Exit E means "after decoder layer E": h_E is the output of the E-th decoder layer (1-based count of
  layers run; `hidden_states[E]` of HF's output_hidden_states for E < L), before any final norm.
- Exit logits = lm_head(norm_E(h_E)). lm_head is the model's own (tied or not). norm_E is the model's
  final norm (`"shared"`) or a norm of the same class and eps with its own weight (`"own"`, initialised
  from the final norm's weight): for Llama/Qwen, y = w_E * x / sqrt(mean(x^2) + rms_norm_eps).
  A `"lens"` exit then maps n = norm_E(h_E) to n + proj_E(n) (a [hidden, hidden] linear layer with bias,
  fitted by `fit_lenses` to predict final_norm(h_L), what the LM head reads from the last layer).
- In an export: the manifest's `transforms["exit_layers"] = {"layers": [E, ...], "norm": "shared"|"own"|"lens",
  "file": "early_exit.safetensors"|null}`; with own norms the file holds `exits.{E}.norm.weight` [hidden]
  in the model's dtype (lenses add `exits.{E}.proj.weight` [hidden, hidden] and `exits.{E}.proj.bias`), covered by the manifest's sha256 list and ignored by transformers.
- Read it with `read_exit_spec(folder)` (+ `load_exit_tensors`) or `load_exits(folder, model)` (an
  `ExitHeads`), and compute with `exit_logits(model, input_ids, exits)` or `ExitHeads.logits(model, E, h_E)`.

Training pieces: `early_exit_loss` + `active_exits` curricula (loss.py), `LayerDropout` (layer_dropout.py).
Evaluation: `evaluate_exits` (eval.py): per-exit perplexity and agreement with the final layer.
"""
from .eval import evaluate_exits, exit_figures, format_exit_table
from .heads import NORMS, ExitHeads, capture_hidden, check_layers, decoder_layers, exit_logits, final_norm
from .io import (EXIT_FILE, ExitSpec, draft_weights, exit_tensors, load_exit_tensors, load_exits, manifest_entry, read_exit_spec,
                 write_with_exits)
from .lens import fit_lenses, lens_normal_equations, solve_lens
from .layer_dropout import SCHEDULES, LayerDropout, dropout_rates
from .loss import CURRICULA, active_exits, check_curriculum, default_weights, early_exit_loss

__all__ = ["CURRICULA", "EXIT_FILE", "NORMS", "SCHEDULES", "ExitHeads", "ExitSpec", "LayerDropout", "active_exits",
           "capture_hidden", "check_curriculum", "check_layers", "decoder_layers", "default_weights", "draft_weights",
           "dropout_rates", "early_exit_loss", "evaluate_exits", "exit_figures", "exit_logits", "exit_tensors",
           "final_norm", "fit_lenses", "format_exit_table", "lens_normal_equations", "solve_lens", "load_exit_tensors", "load_exits", "manifest_entry",
           "read_exit_spec", "write_with_exits"]
