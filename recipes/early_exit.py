"""Early exits: train a model so that chosen layers can predict the next token (LayerSkip-style).

    python recipes/early_exit.py --config configs/early_exit/smollm2-135m.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 recipes/early_exit.py --config ... strategy=ddp
    deepspeed --num_gpus 2 recipes/early_exit.py --config ... strategy=deepspeed_stage_2

Exits after `exit_layers` read through the model's final norm (`norm: shared`), a norm of their
own (`norm: own`), or an affine map and a norm of their own (`norm: lens`, first fitted by least squares
on `lens_fit_blocks` training blocks), and always the model's LM head (see `slimlm.toolkit.early_exit`). Each step
minimises the weighted sum of the final layer's and the active exits' cross-entropy (plus, with
`kd_weight`, each exit's KL to the final layer's logits); the `curriculum` picks the active exits
(all, rotational, gradual); layer dropout skips deeper layers more often (`layer_dropout`, training only).
`train: all` trains every weight; `train: exits` trains only the exits' own norms (and lenses) and the
`unfreeze_layers` decoder layers just below each exit: with `unfreeze_layers: 0` the model's own output
is left exactly as it was.

The result in `<out_dir>/model` is a slimlm export that plain transformers loads unchanged; the
manifest records the exits (`transforms.exit_layers`), and own norms and lenses live in `early_exit.safetensors`.
With `eval_windows > 0` per-exit perplexity and agreement with the final layer on `eval_data` or the
validation split (a local data file has none: without `eval_data`, the training text, said in the results)
are measured after training (and before, with `eval_before`) and stored in the manifest.
Strategies, checkpoints and logs: see training.py.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.recipes import training as T
from slimlm.recipes.config import load_config, to_dict
from slimlm.toolkit.errors import SlimlmError

TRAIN = ("all", "exits")
RESUME_KEYS = ("model", "exit_layers", "norm", "data", "data_split", "max_blocks", "seq_len", "batch_size",
               "grad_accum", "seed", "train", "unfreeze_layers",
               "eval_data", "eval_window", "eval_windows",  # the figures before training (kept) are on that text
               "strategy")  # a Lightning checkpoint is a file, DeepSpeed's a folder of its own


@dataclass
class EarlyExitConfig:
    model: str = "smollm2-135m"
    exit_layers: list[int] = field(default_factory=lambda: [6, 10, 15, 20])
    norm: str = "shared"               # shared (the final norm, as in LayerSkip) | own (a norm per exit) | lens
    lens_fit_blocks: int = 256         # norm=lens: training blocks of the least-squares fit before training (0: none)
    lens_ridge: float = 1e-2
    exit_weights: list[float] | None = None   # one per exit; default E / num_layers
    final_weight: float = 1.0
    curriculum: str = "rotational"     # all | rotational | gradual
    rotation: int | None = None        # rotational: exits active per step = len(exit_layers) / rotation
    layer_dropout: float = 0.0         # p_max, the skip rate of the last layer
    layer_dropout_schedule: str = "exponential"  # linear | exponential | constant
    kd_weight: float = 0.0             # KL of each exit to the final layer's logits
    kd_temperature: float = 1.0
    train: str = "all"                 # all | exits
    unfreeze_layers: int = 0           # train=exits: also train the k decoder layers below each exit
    data: str = "builtin:wiki"
    data_split: str = "train"
    max_blocks: int | None = None
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_steps: int = 100
    grad_clip: float = 1.0
    precision: str = "32"              # 32 | bf16
    chunk_size: int | None = None      # tokens per loss chunk (bounds [tokens, vocab] memory)
    seed: int = 0
    eval_data: str | None = None       # held-out text (default: data's validation split; a local file has none, so
                                       # without eval_data the figures are on the training text, and say so)
    eval_windows: int = 0              # >0: per-exit figures on the eval text, in the manifest
    eval_window: int = 256             # tokens per window, >= 2
    eval_before: bool = False          # also measure the model before training (fresh runs only)
    strategy: str = "auto"
    offload: bool = False
    devices: int | str = "auto"
    num_nodes: int = 1
    checkpoint_every: int = 50
    log_every: int = 10
    out_dir: str = "runs/early_exit"
    log_dir: str | None = None
    progress: bool = True
    threads: int | None = None         # torch threads per process (null: torch's); 1 on a busy shared CPU

    def __post_init__(self):
        from slimlm.toolkit.early_exit import CURRICULA, NORMS, SCHEDULES

        for name, value, allowed in (("norm", self.norm, NORMS), ("curriculum", self.curriculum, CURRICULA),
                                     ("layer_dropout_schedule", self.layer_dropout_schedule, SCHEDULES),
                                     ("train", self.train, TRAIN), ("precision", self.precision, tuple(T.PRECISIONS))):
            if value not in allowed:
                raise SlimlmError(f"unknown {name} {value!r}.", f"Expected one of: {', '.join(allowed)}.")
        T.check_strategy(self.strategy, self.offload, T.accelerator())
        if self.strategy == "deepspeed_stage_3":
            raise SlimlmError("early-exit does not train under deepspeed_stage_3: ZeRO-3's hooks cannot follow the "
                              "exits' forward (a dict of exits per layer, exits that sit out a step).",
                              "Use deepspeed_stage_2 (or ddp, or fsdp on GPUs): the exits are small and the model "
                              "is frozen unless train=all.")
        T.check_schedule(self)
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimlmError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.eval_windows < 0 or self.eval_window < 2:  # else found only after training, with no export
            raise SlimlmError(f"eval_windows must be >= 0 (0: no evaluation) and eval_window >= 2 tokens, got "
                              f"eval_windows={self.eval_windows}, eval_window={self.eval_window}.")
        if not self.exit_layers or any(e < 1 for e in self.exit_layers) or len(set(self.exit_layers)) != len(self.exit_layers):
            raise SlimlmError(f"exit_layers {self.exit_layers} must be distinct layer numbers >= 1.",
                              "Exit E means 'after decoder layer E', e.g. exit_layers=[6,10,15,20].")
        if self.exit_weights is not None and len(self.exit_weights) != len(self.exit_layers):
            raise SlimlmError(f"exit_weights has {len(self.exit_weights)} values for {len(self.exit_layers)} exits.",
                              "Give one weight per exit layer, or null for E / num_layers.")
        if not 0.0 <= self.layer_dropout < 1.0:
            raise SlimlmError(f"layer_dropout must be in [0, 1), got {self.layer_dropout}.")
        if self.rotation is not None and self.rotation < 1:
            raise SlimlmError(f"rotation must be at least 1, got {self.rotation}.")
        if self.lens_fit_blocks < 0 or self.lens_ridge < 0:
            raise SlimlmError(f"lens_fit_blocks and lens_ridge must be >= 0, got {self.lens_fit_blocks} and "
                              f"{self.lens_ridge}.")
        T.check_loss(self, "kd_temperature", "chunk_size")
        T.refuse_bad_values(self, (
            ("exit_weights", self.exit_weights is None or all(w >= 0 for w in self.exit_weights), "weights >= 0"),
            ("final_weight", self.final_weight >= 0, ">= 0"), ("kd_weight", self.kd_weight >= 0, ">= 0"),
            ("unfreeze_layers", self.unfreeze_layers >= 0, ">= 0")))
        if self.train == "exits" and self.norm == "shared" and self.unfreeze_layers < 1:
            raise SlimlmError("train=exits with norm=shared leaves nothing to train.",
                              "Use norm=own, unfreeze_layers=k (k >= 1), or train=all.")


def make_module(model, exits, dropout, *, loss: dict, optim: dict, start_calls: int):
    """The LightningModule: `forward(batch) -> (loss, parts)`, which both training paths call."""
    import lightning as L

    from slimlm.toolkit.early_exit import active_exits, capture_hidden, early_exit_loss

    class EarlyExitModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.exits = model, exits  # both train and are checkpointed
            self.history: list[dict] = []
            self.calls = start_calls  # micro-batches seen: fixes the curriculum and layer-dropout draws

        def forward(self, batch):
            ids, labels = batch["input_ids"], batch["labels"]  # [B, T] each
            step = self.calls // loss["grad_accum"]
            if self.training:
                if dropout is not None:
                    dropout.set_step(self.calls)
                self.calls += 1
            active = active_exits(self.exits.layers, step, loss["max_steps"], loss["curriculum"], loss["rotation"])
            with capture_hidden(self.model, active) as hidden:
                out = self.model(input_ids=ids, use_cache=False)
            total, parts = early_exit_loss(out.logits, self.exits(self.model, hidden, active), labels, loss["weights"],
                                           final_weight=loss["final_weight"], kd_weight=loss["kd_weight"],
                                           temperature=loss["temperature"], chunk_size=loss["chunk_size"])
            idle = [p for e in self.exits.layers if e not in active and str(e) in self.exits.exits
                    for p in self.exits.exits[str(e)].parameters()]
            if idle:  # a zero gradient, not none: DDP needs every trainable weight in the graph
                total = total + 0.0 * sum(p.sum() for p in idle)
            return total, parts

        def training_step(self, batch, batch_idx):
            total, parts = self(batch)
            n = len(batch["input_ids"])
            self.log("loss", parts["loss"], prog_bar=True, logger=False, batch_size=n)
            self.history.append({"step": self.global_step + 1, **parts})
            return total

        def configure_optimizers(self):
            return T.adamw_warmup_cosine(self.parameters(), **optim)

        def on_save_checkpoint(self, checkpoint):
            checkpoint["slimlm_history"] = self.history

        def on_load_checkpoint(self, checkpoint):
            self.history = list(checkpoint.get("slimlm_history", []))

    return EarlyExitModule()


# ---------------------------------------------------------------- model, exits and data

def num_layers_of(spec: str) -> int | None:
    """The model's decoder layer count from its config alone (None where that needs the weights)."""
    layers = getattr(T.model_config_of(spec), "num_hidden_layers", None)  # (a multimodal config nests it)
    return None if layers is None else int(layers)


def check_exit_layers(config: EarlyExitConfig, num_layers: int | None) -> None:
    from slimlm.toolkit.early_exit import check_layers

    if num_layers is not None:
        check_layers(config.exit_layers, num_layers)
        if num_layers in config.exit_layers:
            raise SlimlmError(f"exit layer {num_layers} is the model's last layer: its exit would be the model's own "
                              f"output, and no draft can come from it (self-speculation drafts from layers "
                              f"1..{num_layers - 1}).", f"Use exit layers in 1..{num_layers - 1}.")


def build(config: EarlyExitConfig):
    """`(model, tokenizer, exits)` with the trainable parts chosen by `config.train`."""
    from slimlm.toolkit.early_exit import ExitHeads, decoder_layers
    from slimlm.toolkit.models import load

    model, tokenizer = load(config.model, dtype="float32")
    layers = decoder_layers(model)
    check_exit_layers(config, len(layers))
    exits = ExitHeads.for_model(model, config.exit_layers, config.norm)
    if config.train == "exits":
        model.requires_grad_(False)
        for e in exits.layers:
            for i in range(max(0, e - config.unfreeze_layers), e):
                layers[i].requires_grad_(True)
    return model.train(), tokenizer, exits.train()  # own norms were copied from an eval-mode model


def build_data(config: EarlyExitConfig, tokenizer) -> dict[str, torch.Tensor]:
    from slimlm.toolkit.data import load_texts, pack

    blocks = pack(load_texts(config.data, split=config.data_split, tokenizer=tokenizer), tokenizer, config.seq_len)
    blocks = blocks[:config.max_blocks]  # [N, T]
    return {"input_ids": blocks, "labels": blocks.clone()}


def exit_eval(model, tokenizer, exits, config: EarlyExitConfig) -> dict:
    from slimlm.toolkit.early_exit import evaluate_exits, format_exit_table

    source, split, held_out = T.eval_text(config)
    r = evaluate_exits(model, tokenizer, exits, data=source, split=split, window=config.eval_window,
                       max_windows=config.eval_windows, progress=config.progress)
    r["text"] = "held-out" if held_out else "training"
    if not held_out:
        print(f"early-exit: {source} has no validation split: these figures are on the training text (not held "
              "out); set eval_data to a held-out file for held-out figures", file=sys.stderr)
    print(format_exit_table(r), file=sys.stderr)
    return r


# ---------------------------------------------------------------- the run

def main(config: EarlyExitConfig, resume: bool = False) -> Path:
    """Train exits on `config.model`; returns the export folder (on every rank)."""
    import lightning as L

    from slimlm.toolkit.early_exit import LayerDropout, default_weights, fit_lenses, write_with_exits
    from slimlm.toolkit.export import kept_transforms

    check_exit_layers(config, num_layers_of(config.model))  # before any weights load
    T.check_context(config, config.model, ("seq_len", *(["eval_window"] if config.eval_windows else [])))
    on = T.accelerator()
    out = T.check_out_dir(config.out_dir)
    ckpt_dir, log_dir = out / "checkpoints", Path(config.log_dir or out / "logs")
    found = T.find_checkpoint(ckpt_dir)
    rank = T.env_rank()
    if found and not resume:
        raise SlimlmError(f"{ckpt_dir} already holds a checkpoint (step {found[1]['global_step']}).",
                          "Pass --resume to continue it, or choose another out_dir.")
    T.check_resume(found, T.planned_world(config), config.max_steps, config, RESUME_KEYS)  # before any model loads
    if resume and not found and rank == 0:
        print(f"early-exit: no checkpoint in {ckpt_dir} yet; starting at step 0", file=sys.stderr)
    T.check_data(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, exits = build(config)
    data = build_data(config, tokenizer)
    start_step = found[1]["global_step"] if found else 0
    # The figures taken before training (fresh runs only) come back from the checkpoint on a resume.
    results: dict = dict(found[1].get("before_training", {})) if found else {}
    if config.eval_windows and config.eval_before and not found and rank == 0:
        results["before"] = exit_eval(model, tokenizer, exits, config)
    if config.norm == "lens" and config.lens_fit_blocks and not found:  # a resumed run has its lenses
        t_fit = time.perf_counter()
        fit_lenses(model, exits, data["input_ids"][:config.lens_fit_blocks], ridge=config.lens_ridge,
                   progress=config.progress and rank == 0)
        results["lens_fit_seconds"] = round(time.perf_counter() - t_fit, 2)
        if config.eval_windows and rank == 0:
            results["after_fit"] = exit_eval(model, tokenizer, exits, config)
    weights = (dict(zip(config.exit_layers, config.exit_weights)) if config.exit_weights is not None
               else default_weights(exits.layers, exits.num_layers))
    dropout = LayerDropout(model, config.layer_dropout, config.layer_dropout_schedule, seed=config.seed).install() \
        if config.layer_dropout > 0 else None
    stage = T.zero_stage(config.strategy)
    optim = dict(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                 max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio, cpu_adam=config.offload and stage is not None)
    loss = dict(weights=weights, final_weight=config.final_weight, kd_weight=config.kd_weight,
                temperature=config.kd_temperature, chunk_size=config.chunk_size, curriculum=config.curriculum,
                rotation=config.rotation, max_steps=config.max_steps, grad_accum=config.grad_accum)
    module = make_module(model, exits, dropout, loss=loss, optim=optim, start_calls=start_step * config.grad_accum)
    meta = {"config": to_dict(config),  # in every checkpoint's meta.json
            "before_training": {k: results[k] for k in ("before", "lens_fit_seconds", "after_fit") if k in results}}
    t0 = time.perf_counter()
    history, is_zero, final_step, trainer = T.fit(module, model, data, config, on, stage, ckpt_dir, meta, resume,
                                                  log_dir, "early_exit", found, start_step)
    if dropout is not None:
        dropout.remove()

    steps = T.per_step(history)
    results.update({"steps": final_step, "resumed_from": start_step,
                    "seconds_this_run": round(time.perf_counter() - t0, 2),
                    "first": steps[0] if steps else None, "final": steps[-1] if steps else None})
    model, exits = module.model, module.exits
    if config.strategy == "fsdp":  # gather the full weights into fresh copies on rank 0
        state = trainer.strategy.lightning_module_state_dict()
        if is_zero:
            model, _, exits = build(config)
            model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
            exits.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("exits.")})
    with T.gathered(module, stage):  # ZeRO-3: whole weights on every rank while rank 0 writes
        if is_zero:
            model.eval()
            if config.eval_windows:
                results["after"] = exit_eval(model, tokenizer, exits, config)
            manifest = {"base_model": config.model, "config": to_dict(config), "eval": {"early_exit": results},
                        "transforms": kept_transforms(config.model), "command": " ".join(sys.argv)}
            export_dir = write_with_exits(model, tokenizer, exits, out / "model", meta=manifest, overwrite=True)
            # the total weighs the exits active at that step (rotational, gradual): two steps' totals need not
            # compare; the final layer's cross-entropy is in every step
            key, what = ("loss", "loss") if config.curriculum == "all" else ("ce_final", "final layer's CE")
            first, final = (f"{results[k][key]:.4f}" if results[k] and key in results[k] else "-"
                            for k in ("first", "final"))
            print(f"early-exit: {final_step} steps, {what} {first} -> {final}; wrote {export_dir}")
    T.barrier()
    return out / "model"


# ---------------------------------------------------------------- command line

def add_early_exit(sub) -> None:
    T.add_launch_arguments(sub.add_parser("early-exit", help="train early-exit heads (LayerSkip-style loss, "
                                          "curricula, layer dropout)", description=__doc__.split("\n\n")[0]))


def run_early_exit(args) -> int:
    config = load_config(EarlyExitConfig, args.config, args.overrides)
    T.run_leaving_no_empty_out_dir(config.out_dir, lambda: main(config, resume=args.resume))
    return 0


def cli(argv: list[str] | None = None) -> int:
    from slimlm.recipes.cli import run_script

    return run_script("early-exit", argv)


if __name__ == "__main__":
    sys.exit(cli())
