"""Exits on disk: the manifest entry, the `early_exit.safetensors` file, and loading them back.

An export with exits is a normal slimlm export (plain HF folder + `slimlm.json`) plus:
- `transforms["exit_layers"]` in the manifest:
  `{"layers": [8, 16], "norm": "shared" | "own" | "lens", "file": "early_exit.safetensors" | null}`;
- with own norms or lenses, `early_exit.safetensors` holding `exits.{E}.norm.weight` ([hidden], the
  model's dtype) for every E in `layers`, and for lenses `exits.{E}.proj.weight` [hidden, hidden] and
  `exits.{E}.proj.bias` [hidden]. Its sha256 is in the manifest like every `*.safetensors` file,
  and transformers never reads it (it loads `model.safetensors` or its index's files only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SlimlmError
from .heads import NORMS, ExitHeads, decoder_layers, final_norm

EXIT_FILE = "early_exit.safetensors"


@dataclass(frozen=True)
class ExitSpec:
    """What the manifest says about the exits of an export."""

    layers: list[int]
    norm: str               # "shared" | "own" | "lens"
    file: str | None        # EXIT_FILE with own norms or lenses, else None


def manifest_entry(exits: ExitHeads) -> dict:
    """The value of `transforms["exit_layers"]` for `exits`."""
    return {"layers": list(exits.layers), "norm": exits.norm_kind,
            "file": EXIT_FILE if exits.norm_kind != "shared" else None}


def exit_tensors(exits: ExitHeads) -> dict[str, torch.Tensor]:
    """`{"exits.{E}.norm.weight": tensor, ...}` (empty for shared norms)."""
    return {k: v.detach() for k, v in exits.state_dict().items()}


def write_with_exits(model, tokenizer, exits: ExitHeads, out_dir: str | os.PathLike, meta: dict | None = None,
                     overwrite: bool = False) -> Path:
    """`toolkit.export.write` with the exits recorded in the manifest (and their file, for own norms and lenses)."""
    from ..export import write

    meta = dict(meta or {})
    meta["transforms"] = {**(meta.get("transforms") or {}), "exit_layers": manifest_entry(exits)}
    extra = {EXIT_FILE: exit_tensors(exits)} if exits.norm_kind != "shared" else None
    return write(model, tokenizer, out_dir, meta=meta, overwrite=overwrite, extra_tensors=extra)


def read_exit_spec(folder: str | os.PathLike, verify: bool = True) -> ExitSpec | None:
    """The exits of the export at `folder` (its files verified unless `verify=False`), or None if it has none."""
    from ..export import read

    entry = read(folder, verify=verify).transforms.get("exit_layers")
    if entry is None:
        return None
    bad = SlimlmError(f"{folder}: the manifest's exit_layers entry is malformed ({entry!r}).",
                      "Re-export the model with the early-exit recipe.")
    if not isinstance(entry, dict) or set(entry) != {"layers", "norm", "file"} or entry["norm"] not in NORMS:
        raise bad
    layers = entry["layers"]
    if not isinstance(layers, list) or not layers or not all(isinstance(e, int) and e >= 1 for e in layers):
        raise bad
    if (entry["norm"] != "shared") != (entry["file"] == EXIT_FILE):
        raise bad
    return ExitSpec(sorted(layers), entry["norm"], entry["file"])


def load_exit_tensors(folder: str | os.PathLike, spec: ExitSpec) -> dict[str, torch.Tensor]:
    """The raw tensors of `spec.file` (empty for shared norms), with exactly the keys the spec implies."""
    from safetensors.torch import load_file

    if spec.file is None:
        return {}
    tensors = load_file(str(Path(folder) / spec.file))
    names = ("norm.weight", "proj.weight", "proj.bias") if spec.norm == "lens" else ("norm.weight",)
    want = {f"exits.{e}.{name}" for e in spec.layers for name in names}
    if set(tensors) != want:
        raise SlimlmError(f"{Path(folder) / spec.file} holds {sorted(tensors)}, expected {sorted(want)}.",
                          "Re-export the model with the early-exit recipe.")
    return tensors


def draft_weights(folder: str | os.PathLike, spec: ExitSpec | None, layer: int):
    """`(norm weight [D] | None, (proj weight [D, D], proj bias [D]) | None)` that a draft from exit `layer`
    of the export at `folder` reads through: both None for shared norms or a layer the export has no exit at
    (the model's final norm is used), no proj for own norms."""
    if spec is None or spec.norm == "shared" or layer not in spec.layers:
        return None, None
    tensors = load_exit_tensors(folder, spec)
    proj = (tensors[f"exits.{layer}.proj.weight"], tensors[f"exits.{layer}.proj.bias"]) if spec.norm == "lens" else None
    return tensors[f"exits.{layer}.norm.weight"], proj


def load_exits(folder: str | os.PathLike, model, verify: bool = True) -> ExitHeads:
    """The ExitHeads of the export at `folder`, for `model` (loaded from it), on the model's device and dtype.

    SlimlmError if the export records no exits or they do not fit the model.
    """
    spec = read_exit_spec(folder, verify=verify)
    if spec is None:
        raise SlimlmError(f"{folder} records no early exits (transforms.exit_layers is null).",
                          "Train exits with `slimlm early-exit`, or name exit layers to use the shared norm.")
    exits = ExitHeads(spec.layers, len(decoder_layers(model)), spec.norm,
                      final_norm(model) if spec.norm != "shared" else None)
    tensors = load_exit_tensors(folder, spec)
    if tensors:
        try:
            exits.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise SlimlmError(f"{folder}: exit weights do not fit the model ({err}).") from err
    return exits.to(final_norm(model).weight.device).eval()
