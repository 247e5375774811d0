"""Quantization-aware training: train through int4/int8 fake-quant weights, export a GPTQ checkpoint.

    python recipes/qat.py --config configs/qat/smollm2-135m.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 recipes/qat.py --config ... strategy=ddp
    deepspeed --num_gpus 2 recipes/qat.py --config ... strategy=deepspeed_stage_2
    slimlm qat --config ...

The model's decoder linears (LM head and embeddings skipped by default) become FakeQuantLinears
(`slimlm.toolkit.quant.qat`): the forward pass uses the weight rounded to the `quant` scheme, the
backward pass is a straight-through estimator into the full-precision latent weight. `init: rtn` starts
from the RTN model (scales follow the weights, RTN's rule); `init: gptq` runs GPTQ first on
`calibration` windows of the training split and trains on GPTQ's frozen grid. The loss is KL to the
unquantised model's logits (`loss.kd_weight`, the teacher: a frozen copy of the model as loaded, not
a registered submodule) plus optional cross-entropy (`loss.ce_weight`). `train: quantized` trains the
quantized linears only; `all` also the norms and embeddings (which the export stores in the scale dtype).

The result in `<out_dir>/model` is the same packed GPTQ checkpoint as `slimlm quantize` writes (what
vLLM, SGLang, TGI and slimlm's engine serve), holding exactly the codes of the last forward pass. With
`eval_windows > 0`, the perplexity of the unquantised model, of the start (RTN/GPTQ) and of the
result goes into the manifest (`eval.qat`): held out (`eval_data`, or the validation split of built-in and
hub data), or, for a local data file without `eval_data`, on the training text, which the manifest says (`perplexity_text`). LoRA is not offered: see the note at
`QATConfig`.
Strategies, checkpoints and logs: see training.py.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.recipes import training as T
from slimlm.recipes.config import load_config, to_dict
from slimlm.toolkit.errors import SlimlmError

RESUME_KEYS = ("model", "quant", "init", "grid", "calibration", "train", "data", "data_split", "max_blocks",
               "seq_len", "batch_size", "grad_accum", "seed",  # what fixes the start, the data order and the targets
               "eval_data", "eval_window", "eval_windows",  # the first run's perplexities are on that text
               "strategy")  # a Lightning checkpoint is a file, DeepSpeed's a folder of its own


@dataclass
class QuantConfig:                     # the fields of toolkit.quant.QuantScheme
    bits: int = 4
    group_size: int = 64               # 32 | 64 | 128 | -1 (per channel)
    sym: bool = False
    scale_dtype: str = "float16"
    act_order: bool = False            # GPTQ's desc_act (init: gptq)
    static_groups: bool = False
    skip: list[str] = field(default_factory=lambda: ["lm_head", "embed"])

    def scheme(self):
        from slimlm.toolkit.quant.scheme import QuantScheme

        return QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym, scale_dtype=self.scale_dtype,
                           act_order=self.act_order, static_groups=self.static_groups, skip=tuple(self.skip))


@dataclass
class CalibrationConfig:               # init: gptq only; windows of the training split of `data`
    samples: int = 128
    seq_len: int = 512
    damp: float = 0.01


@dataclass
class LossConfig:
    kd_weight: float = 1.0             # KL to the unquantised model's logits (0: no teacher is kept)
    ce_weight: float = 0.0             # next-token cross-entropy on the data
    kind: str = "forward_kl"           # forward_kl | reverse_kl | skew_kl | skew_reverse_kl | js
    temperature: float = 1.0
    chunk_size: int | None = None      # tokens per loss chunk (bounds [tokens, vocab] memory)


@dataclass
class QATConfig:
    """Settings of a QAT run. No LoRA: peft's adapter adds an unquantized B·A·x beside the quantized
    weight, which the packed checkpoint cannot hold without re-rounding W + B·A after training; the
    served model would then not be the trained one, against this recipe's point."""

    model: str = "smollm2-135m"
    quant: QuantConfig = field(default_factory=QuantConfig)
    init: str = "rtn"                  # rtn | gptq
    grid: str | None = None            # dynamic | frozen; default: dynamic for rtn, frozen for gptq
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    train: str = "quantized"           # quantized (the fake-quant linears) | all
    data: str = "builtin:wiki"
    data_split: str = "train"
    max_blocks: int | None = None
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_steps: int = 100
    grad_clip: float = 1.0
    precision: str = "32"              # 32 | bf16
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    eval_data: str | None = None       # held-out text (default: data's validation split; a local file has none, so
                                       # without eval_data its figures are on the training text, and say so)
    eval_windows: int = 0              # >0: perplexity of base, start and result in the manifest
    eval_window: int = 512             # tokens per window, >= 2
    strategy: str = "auto"             # auto | ddp | fsdp | deepspeed_stage_1 | 2 | 3
    offload: bool = False
    devices: int | str = "auto"
    num_nodes: int = 1
    checkpoint_every: int = 50
    log_every: int = 10
    out_dir: str = "runs/qat"
    log_dir: str | None = None
    threads: int | None = None         # torch threads per process (null: torch's); 1 on a busy shared CPU
    progress: bool = True

    def __post_init__(self):
        from slimlm.toolkit.distill import KINDS
        from slimlm.toolkit.quant.qat import check_qat_options

        for name, value, allowed in (("precision", self.precision, tuple(T.PRECISIONS)), ("loss.kind", self.loss.kind, KINDS),
                                     ("train", self.train, ("quantized", "all"))):
            if value not in allowed:
                raise SlimlmError(f"unknown {name} {value!r}.", f"Expected one of: {', '.join(allowed)}.")
        check_qat_options(self.quant.scheme(), self.init, self.grid)  # the scheme checks its own fields
        T.check_strategy(self.strategy, self.offload, T.accelerator())
        T.check_schedule(self)
        counts = {name: getattr(self, name) for name in ("seq_len", "batch_size", "grad_accum", "max_steps",
                                                          "log_every", "eval_window")}
        if self.threads is not None:
            counts["threads"] = self.threads
        counts.update({"calibration.samples": self.calibration.samples, "calibration.seq_len": self.calibration.seq_len})
        for name, value in counts.items():
            if value < 1:
                raise SlimlmError(f"{name} must be at least 1, got {value}.")
        if self.loss.kd_weight < 0 or self.loss.ce_weight < 0 or self.loss.kd_weight == self.loss.ce_weight == 0:
            raise SlimlmError(f"loss.kd_weight={self.loss.kd_weight} and loss.ce_weight={self.loss.ce_weight}: "
                              "both must be >= 0 and at least one positive.",
                              "Use loss.kd_weight=1 (distil from the unquantised model) and/or loss.ce_weight=1.")
        if self.eval_windows < 0 or self.eval_window < 2:
            raise SlimlmError(f"eval_windows must be >= 0 (0: no evaluation) and eval_window >= 2 tokens, got "
                              f"eval_windows={self.eval_windows}, eval_window={self.eval_window}.")
        T.check_loss(self, "loss.temperature", "loss.chunk_size")
        if not self.calibration.damp > 0:
            raise SlimlmError(f"calibration.damp must be > 0, got {self.calibration.damp}.")


def make_module(model, teacher, *, loss: LossConfig, optim: dict):
    """The LightningModule: `forward(batch) -> (loss, parts)`, which both training paths call."""
    import lightning as L

    from slimlm.toolkit.distill import distill_objective

    class QATModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model                           # registered: trains and is checkpointed
            object.__setattr__(self, "teacher", teacher)  # not registered: never sharded or saved
            self.history: list[dict] = []

        def forward(self, batch):
            ids, labels = batch["input_ids"], batch["labels"]  # [B, T] each
            logits = self.model(input_ids=ids, use_cache=False).logits  # [B, T, V]
            target = None
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher(input_ids=ids, use_cache=False).logits  # [B, T, V]
            total, parts = distill_objective(logits, target, labels, kd_weight=loss.kd_weight, ce_weight=loss.ce_weight,
                                             kind=loss.kind, temperature=loss.temperature, chunk_size=loss.chunk_size)
            return total, {k: float(v) for k, v in parts.items() if k != "tokens"}

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

    return QATModule()


# ---------------------------------------------------------------- model and data

def build(config: QATConfig, skeleton: bool = False, with_teacher: bool = True):
    """`(fake-quant model, tokenizer, teacher or None, unquantised perplexity or None)`.

    The teacher is a frozen copy of the model as loaded (kept only with `loss.kd_weight > 0`).
    `skeleton`: the start is about to be replaced by a checkpoint (resume, FSDP gather), so a frozen
    grid is laid out by RTN instead of running GPTQ again: the checkpoint holds GPTQ's grid.
    """
    from slimlm.toolkit.data import calibration_samples, load_texts
    from slimlm.toolkit.models import load
    from slimlm.toolkit.quant.qat import check_qat_options, fake_quant_linears, prepare_qat, qat_parameters

    scheme = config.quant.scheme()
    grid = check_qat_options(scheme, config.init, config.grid)
    model, tokenizer = load(config.model, dtype="float32")
    base_ppl = perplexity(model, tokenizer, config) if config.eval_windows and not skeleton and T.env_rank() == 0 else None
    teacher = None
    if config.loss.kd_weight > 0 and with_teacher:
        device = f"cuda:{T.env_local_rank()}" if T.accelerator() == "gpu" else "cpu"
        teacher = copy.deepcopy(model).to(device, torch.bfloat16 if config.precision == "bf16" else torch.float32)
        teacher.requires_grad_(False).eval()
    if skeleton and config.init == "gptq":
        prepare_qat(model, dataclasses.replace(scheme, act_order=False, static_groups=False), "rtn", grid="frozen")
        for fq in fake_quant_linears(model).values():
            fq.scheme = scheme
    else:
        samples = None
        if config.init == "gptq":
            texts = load_texts(config.data, split=config.data_split, tokenizer=tokenizer)
            samples = calibration_samples(texts, tokenizer, config.calibration.samples, config.calibration.seq_len,
                                          seed=config.seed)
        prepare_qat(model, scheme, config.init, grid=grid, samples=samples, damp=config.calibration.damp,
                    progress=config.progress)
    qat_parameters(model, config.train)
    return model.train(), tokenizer, teacher, base_ppl


def build_data(config: QATConfig, tokenizer) -> dict[str, torch.Tensor]:
    from slimlm.toolkit.data import load_texts, pack

    blocks = pack(load_texts(config.data, split=config.data_split, tokenizer=tokenizer), tokenizer, config.seq_len)
    blocks = blocks[:config.max_blocks]  # [N, T]
    return {"input_ids": blocks, "labels": blocks.clone()}


def perplexity(model, tokenizer, config: QATConfig) -> float:
    """Perplexity on `T.eval_text(config)` (held out unless the data is a local file and eval_data is unset)."""
    from slimlm.toolkit.data import load_texts, token_stream
    from slimlm.toolkit.eval import perplexity as ppl

    source, split, _ = T.eval_text(config)
    stream = token_stream(load_texts(source, split=split, tokenizer=tokenizer), tokenizer)
    was_training = model.training
    r = ppl(model, stream, window=config.eval_window, max_windows=config.eval_windows, progress=config.progress)
    model.train(was_training)
    return round(r["perplexity"], 4)


def gap_closed(base: float, start: float, after: float) -> float | None:
    """The share of the quantization gap (start - base perplexity) that training closed; None where the start was
    already at or below the base's perplexity: there was no gap, and a ratio over it would mislead."""
    return round((start - after) / (start - base), 4) if start > base else None


# ---------------------------------------------------------------- the run

def main(config: QATConfig, resume: bool = False) -> Path:
    """QAT of `config.model`; returns the GPTQ export folder (on every rank)."""
    import lightning as L

    from slimlm.toolkit.export import kept_transforms
    from slimlm.toolkit.models import resolve
    from slimlm.toolkit.quant.gptq_format import save_gptq
    from slimlm.toolkit.quant.qat import convert_qat

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
        print(f"qat: no checkpoint in {ckpt_dir} yet; starting at step 0", file=sys.stderr)
    resolve(config.model)
    T.check_data(config)
    T.check_context(config, config.model, ("seq_len", *(["eval_window"] if config.eval_windows else []),
                                           *(["calibration.seq_len"] if config.init == "gptq" else [])))
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, teacher, base_ppl = build(config, skeleton=bool(found))
    data = build_data(config, tokenizer)
    results: dict = {"scheme": config.quant.scheme().to_dict(), "init": config.init}
    held_out = T.eval_text(config)[2]
    on_text = "held-out perplexity" if held_out else "perplexity on the training text"
    if config.eval_windows:  # which text the perplexities are on, beside them in the manifest
        results["perplexity_text"] = "held-out" if held_out else "training"
        if not held_out and rank == 0:
            print(f"qat: {config.data} has no validation split, so perplexity is measured on the training text "
                  "(not held out); set eval_data to a held-out file for a held-out figure", file=sys.stderr)
    before = dict(found[1].get("perplexity_before", {})) if found else {}  # a resumed run keeps the first run's
    if config.eval_windows and not found and rank == 0:
        before = {"perplexity_base": base_ppl, "perplexity_start": perplexity(model, tokenizer, config)}
        print(f"qat: {on_text} {base_ppl:.3f} unquantised, {before['perplexity_start']:.3f} "
              f"at the start ({config.init})", file=sys.stderr)
    results.update(before)
    stage = T.zero_stage(config.strategy)
    optim = dict(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                 max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio, cpu_adam=config.offload and stage is not None)
    module = make_module(model, teacher, loss=config.loss, optim=optim)
    meta = {"config": to_dict(config), "perplexity_before": before}  # in every checkpoint's meta.json
    start_step = found[1]["global_step"] if found else 0
    t0 = time.perf_counter()
    history, is_zero, final_step, trainer = T.fit(module, model, data, config, on, stage, ckpt_dir, meta, resume,
                                                  log_dir, "qat", found, start_step)

    steps = T.per_step(history)
    results.update({"steps": final_step, "resumed_from": start_step, "seconds_this_run": round(time.perf_counter() - t0, 2),
                    "first": steps[0] if steps else None, "final": steps[-1] if steps else None})
    model = module.model
    if config.strategy == "fsdp":  # gather the full weights into a fresh skeleton on rank 0
        state = trainer.strategy.lightning_module_state_dict()
        if is_zero:
            model = build(config, skeleton=True, with_teacher=False)[0]
            model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    export_dir = out / "model"
    with T.gathered(module, stage):  # ZeRO-3: whole weights on every rank while rank 0 writes
        if is_zero:
            model.eval()
            quantized = convert_qat(model)  # the model now holds exactly the weights the checkpoint stores
            if config.eval_windows:
                results["perplexity_after"] = perplexity(model, tokenizer, config)
                start, base = results.get("perplexity_start"), results.get("perplexity_base")
                if start is not None and base is not None:
                    results["gap_closed"] = gap_closed(base, start, results["perplexity_after"])
            manifest = {"base_model": config.model, "config": to_dict(config), "eval": {"qat": results},
                        "transforms": {**kept_transforms(config.model), "quant": {"method": "qat", "init": config.init}},
                        "command": " ".join(sys.argv)}
            save_gptq(model, tokenizer, quantized, config.quant.scheme(), export_dir, meta=manifest, overwrite=True)
            first, final = (f"{results[k]['loss']:.4f}" if results[k] else "-" for k in ("first", "final"))
            ppl = f", {on_text} {results['perplexity_after']:.3f}" if "perplexity_after" in results else ""
            if "gap_closed" in results:
                ppl += (f" (below unquantised {results['perplexity_base']:.3f}: the whole gap closed, within the "
                        f"noise of eval_windows={config.eval_windows})" if (results["gap_closed"] or 0) > 1 else
                        f" (closed {results['gap_closed']:.0%} of the gap to unquantised)"
                        if results["gap_closed"] is not None else
                        f" (gap closed: n/a, the start {results['perplexity_start']:.3f} was already at or below "
                        f"unquantised {results['perplexity_base']:.3f})")
            print(f"qat: {final_step} steps, loss {first} -> {final}{ppl}; wrote {export_dir}")
    T.barrier()
    return export_dir


# ---------------------------------------------------------------- command line

def add_qat(sub) -> None:
    T.add_launch_arguments(sub.add_parser("qat", help="quantization-aware training (fake-quant int4/int8, "
                                          "RTN or GPTQ start) to a GPTQ checkpoint", description=__doc__.split("\n\n")[0]))


def run_qat(args) -> int:
    config = load_config(QATConfig, args.config, args.overrides)
    T.run_leaving_no_empty_out_dir(config.out_dir, lambda: main(config, resume=args.resume))
    return 0


def cli(argv: list[str] | None = None) -> int:
    from slimlm.recipes.cli import run_script

    return run_script("qat", argv)


if __name__ == "__main__":
    sys.exit(cli())
