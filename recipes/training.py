"""Plumbing every training recipe shares: launch arguments, strategy choice, data order,
checkpoint/resume, logging, and the DeepSpeed engine loop used where Lightning cannot run ZeRO.

Strategies (`STRATEGIES`): auto, ddp, fsdp, deepspeed_stage_1|2|3 (+ offload). On GPUs each is
Lightning's own. On CPU Lightning refuses DeepSpeed and FSDP: ddp runs on gloo, deepspeed_stage_N
runs through DeepSpeed's engine (`run_deepspeed`: same module, data order, schedule, checkpoints and
logs), fsdp is refused. `run_deepspeed` needs `module(batch) -> (loss, parts)` and Lightning's
`configure_optimizers()` dict.

Checkpoints: `<ckpt_dir>/last/` holds `meta.json` (global step, config) and `state.ckpt`, written
under a temporary name and renamed into place: a run killed while saving keeps the previous one.
Lightning's `state.ckpt` file holds only tensors and plain containers and is loaded with
`weights_only=True`. DeepSpeed's `state.ckpt/` folder is loaded by DeepSpeed with
`weights_only=False` (its files hold pickled DeepSpeed classes): trusted local state only, never
files to exchange; exchange models as exports (safetensors).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from slimlm.toolkit.errors import SlimlmError

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}


# ---------------------------------------------------------------- launching

def add_launch_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--config FILE [key=value ...] [--resume]`; accepts the `--local_rank` that `deepspeed` passes
    (unused: the launcher sets LOCAL_RANK in the environment too, which is what is read)."""
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", required=True, help="YAML file of settings (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override settings, e.g. max_steps=50 lr=1e-4 (a section's key as section.key=value; values "
                        "parsed as YAML)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in out_dir")
    return p


def quiet_libraries() -> None:
    """Our progress bar and summary speak; transformers' per-load bars and Lightning's tips do not."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*(does not have many workers|is not resumable|sync_dist|LeafSpec"
                            "|Experiment logs directory).*")  # the last: CSV rows are appended, not lost


def env_rank() -> int:
    """The global rank the launcher gave, pre-init: torchrun's and deepspeed's RANK; Lightning's own launch sets
    LOCAL_RANK in the processes it starts, on node NODE_RANK (0 only for its first process; any other is not 0,
    which is what callers ask), also inside an interactive SLURM shell (whose SLURM_PROCID its children inherit);
    else srun's SLURM_PROCID (srun sets no RANK)."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if os.environ.get("LOCAL_RANK") or not os.environ.get("SLURM_PROCID"):
        node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        return local if node == 0 else node * 1_000_000 + local
    return int(os.environ["SLURM_PROCID"])


def env_local_rank() -> int:
    """This process's GPU index on its node: LOCAL_RANK, or SLURM's SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def rank_zero_first(path: Path, make, rank: int, timeout_s: float = 6 * 3600) -> None:
    """Rank 0 runs `make()` unless `path` exists; the other ranks wait until it does.

    For one-off work before training (teacher generations, a teacher cache) that must not run once
    per rank. `make` must create `path` last and atomically (write elsewhere, then rename)."""
    if rank == 0:
        if not Path(path).exists():
            make()
        return
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise SlimlmError(f"rank {rank} waited {timeout_s:.0f} s for rank 0 to write {path}.",
                              "Check rank 0's output for an error (multi-node: out_dir must be shared).")
        time.sleep(1.0)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def per_step(history: list[dict]) -> list[dict]:
    """Micro-batch records `{"step": s, name: value, ...}` averaged into one record per step."""
    steps: dict[int, list[dict]] = {}
    for rec in history:
        steps.setdefault(rec["step"], []).append(rec)
    return [{"step": s, **{k: sum(r[k] for r in recs) / len(recs) for k in recs[0] if k != "step"}}
            for s, recs in sorted(steps.items())]


def accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_strategy(strategy: str, offload: bool, on: str) -> None:
    """Refuse a strategy that does not exist, or that cannot run on accelerator `on`, before any work."""
    if strategy not in STRATEGIES:
        raise SlimlmError(f"unknown strategy {strategy!r}.", f"Expected one of: {', '.join(STRATEGIES)}.")
    if strategy == "fsdp" and on == "cpu":
        raise SlimlmError("strategy fsdp needs GPUs (Lightning's FSDP refuses CPU).",
                          "On CPU use strategy=ddp, or deepspeed_stage_3 to shard parameters.")
    if offload and zero_stage(strategy) is None and strategy != "fsdp":
        raise SlimlmError(f"offload=true needs strategy fsdp or deepspeed_stage_N, not {strategy}.")


def refuse_bad_values(config, checks) -> None:
    """Refuse the first of `checks`, each (key, whether its value is good, what is expected), that fails, naming the
    key (dotted for a section's: "loss.temperature") and its value. Called from the configs' `__post_init__`, so a
    bad value stops the run before any model loads."""
    for name, ok, expected in checks:
        if not ok:
            raise SlimlmError(f"{name} must be {expected}, got {setting(config, name)!r}.")


def setting(config, key: str):
    """The value of `key` in a config, dotted for a section's ("loss.temperature")."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def check_loss(config, temperature: str, chunk_size: str) -> None:
    """The loss settings the recipes share, by their keys: a temperature (> 0) and a chunk size (null or >= 1)."""
    t, c = setting(config, temperature), setting(config, chunk_size)
    refuse_bad_values(config, ((temperature, t > 0, "> 0 (1.0 is the usual choice)"),
                               (chunk_size, c is None or c >= 1, ">= 1 tokens, or null for the whole batch at once")))


def check_schedule(config) -> None:
    """Refuse the shared training settings that would train wrongly or fail late (a negative LR, a block
    count of 0, no devices, a seed numpy refuses), naming the key; every recipe's config calls this from
    `__post_init__`."""
    checks = (("lr", config.lr > 0, "> 0"), ("weight_decay", config.weight_decay >= 0, ">= 0"),
              ("warmup_steps", config.warmup_steps >= 0, ">= 0"),
              ("min_lr_ratio", 0 <= config.min_lr_ratio <= 1, "in [0, 1] (the final LR as a fraction of lr)"),
              ("grad_clip", config.grad_clip >= 0, ">= 0 (0: no clipping)"),
              ("checkpoint_every", config.checkpoint_every >= 0, ">= 0 (0: only at the end)"),
              ("max_blocks", config.max_blocks is None or config.max_blocks >= 1, ">= 1, or null for all blocks"),
              ("num_nodes", config.num_nodes >= 1, ">= 1"),
              ("devices", not isinstance(config.devices, int) or config.devices >= 1, ">= 1, or auto"),
              ("seed", isinstance(config.seed, int) and 0 <= config.seed < 2**32, "an integer in 0..4294967295"))
    refuse_bad_values(config, checks)


def check_out_dir(out_dir: str) -> Path:
    """`out_dir` as a Path, refused if it names an existing file (the run writes a folder there) or a place where
    no folder can be made."""
    from slimlm.toolkit.export.writer import check_folder_can_be_made

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"out_dir {out} is a file; the run writes a folder there (checkpoints, logs, the export).",
                          "Set out_dir to a folder (new or existing).")
    check_folder_can_be_made(out, "the run's folder", beside=False)
    return out


def run_leaving_no_empty_out_dir(out_dir: str, run):
    """`run()`; where it fails and leaves `out_dir`, which did not exist before, empty (a bad data file, another
    tokenizer: refused before any write), remove the folder again, so that nothing looks like a run."""
    out = Path(out_dir)
    existed = out.exists()
    try:
        return run()
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            with contextlib.suppress(OSError):  # another rank may have removed it first
                out.rmdir()
        raise


def check_resume(found: tuple[Path, dict] | None, world: int | None, max_steps: int, config=None,
                 keys: tuple[str, ...] = ()) -> None:
    """Refuse a resume that would not continue the run: a setting of `keys` (dotted for a section's:
    "loss.hidden_layers") other than the checkpoint's config says (what fixes the data order, the targets, or the
    checkpoint's layout: LoRA adapters, an aligner's weights, the strategy's file or folder), another number of
    processes (each takes its own positions of the data order, so samples would be skipped or seen twice), or a
    checkpoint past max_steps. `world` None: not known yet (devices=auto), checked once the trainer has it."""
    if not found:
        return
    if config is not None:
        from slimlm.recipes.config import to_dict

        def at(settings: dict, key: str):
            for part in key.split("."):
                settings = settings.get(part) if isinstance(settings, dict) else None
            if isinstance(settings, dict) and settings.get("enabled") is False:
                return {"enabled": False}  # a section switched off: its other settings change nothing
            return settings

        def same(key: str, value):  # auto and ddp write the same single Lightning file (auto is ddp on several)
            return "auto" if key == "strategy" and value == "ddp" else value

        now = json.loads(json.dumps(to_dict(config), default=str))  # as the checkpoint's JSON holds it: lists
        changed = [k for k in keys if same(k, at(found[1]["config"], k)) != same(k, at(now, k))]
        if changed:
            was = "; ".join(f"{k}: {at(found[1]['config'], k)!r} there, {at(now, k)!r} now" for k in changed)
            raise SlimlmError(f"cannot resume: {', '.join(changed)} differ from the checkpoint's config ({was}).",
                              "Resume with the same settings, or start a new out_dir.")
    step, was = found[1]["global_step"], found[1].get("world_size")  # checkpoints before this have no world_size
    if was is not None and world is not None and was != world:
        raise SlimlmError(f"the checkpoint in {found[0]} was written by {was} process(es); this run has {world}. "
                          "Each process reads its own positions of the data order, so resuming would skip or repeat "
                          "samples.", "Resume with the same devices and num_nodes, or start a new out_dir.")
    if step > max_steps:
        raise SlimlmError(f"the checkpoint in {found[0]} is at step {step}, past max_steps={max_steps}.",
                          f"Pass max_steps={step} or more (equal: export it again without training).")


def model_config_of(spec: str):
    """The model's Hugging Face config from its config.json alone, without weights (None where that is out of
    reach: a GGUF file, a hub id offline, an unusual config; those are checked once the model loads)."""
    from transformers import AutoConfig

    from slimlm.toolkit.models import builtin_model_dir, resolve

    source = resolve(spec)
    if source.kind == "gguf":
        return None
    location = builtin_model_dir(source.location) if source.kind == "builtin" else source.location
    try:
        return AutoConfig.from_pretrained(location)
    except Exception:
        return None


def context_length(model_config) -> int | None:
    """The longest sequence a model's config says it reads: max_position_embeddings, or the rope-scaled length
    where its rope scaling stretches the original one (yarn, dynamic, linear); None where the config names none."""
    limit = getattr(model_config, "max_position_embeddings", None)
    rope = getattr(model_config, "rope_scaling", None) or getattr(model_config, "rope_parameters", None)
    if limit and isinstance(rope, dict) and rope.get("factor") and rope.get("rope_type", rope.get("type")) not in (
            None, "default"):
        limit = max(limit, int(rope["factor"] * rope.get("original_max_position_embeddings", limit)))
    return limit


def check_context(config, spec: str, keys: tuple[str, ...], flags: bool = False) -> None:
    """Refuse token lengths (`keys`, dotted for a section's; only those the run uses) longer than the model's
    context, before any weights load: past it the positions have no meaning, and the logits alone of a
    100,000-token block fill the memory. `flags`: name them as command-line flags (`--calib-len`)."""
    limit = context_length(model_config_of(spec))
    if not limit:
        return
    for key in keys:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value and value > limit:
            shown = f"--{key.replace('_', '-')} {value}" if flags else f"{key}={value}"  # as the user wrote it
            raise SlimlmError(f"{shown} is longer than {spec}'s context ({limit} tokens, max_position_embeddings).",
                              f"Set {shown.split('=')[0].split()[0]} to at most {limit}.")


def check_data(config) -> None:
    """Refuse a training or evaluation data spec that names no readable source (`data`, `eval_data`), before any
    model loads: a typo must not wait for the teacher's load or the previous variant's work."""
    from slimlm.toolkit.data import check_source

    for key in ("data", "eval_data"):
        spec = getattr(config, key, None)
        if spec:
            try:
                check_source(spec)
            except SlimlmError as err:
                raise SlimlmError(f"{key}: {err.what}", err.hint) from None


def eval_text(config) -> tuple[str, str, bool]:
    """`(source, split, held_out)` of a recipe's evaluation text: `eval_data`, else the validation split of built-in
    and hub data. A local file has no split of its own: without `eval_data` that is the training text itself; nor
    has a hub spec that names its split (`hf:id:config:train`), which that split always reads."""
    from slimlm.toolkit.data import parse_hub_spec

    def read_split(spec: str, split: str) -> str:
        return (spec.startswith("hf:") and parse_hub_spec(spec)[2]) or split

    source = config.eval_data or config.data
    split = read_split(source, "validation" if source.startswith(("builtin:", "hf:")) else config.data_split)
    return source, split, not (source == config.data and split == read_split(config.data, config.data_split))


def planned_world(config) -> int | None:
    """The number of training processes `config` asks for, where known before the trainer starts (not for
    DeepSpeed's own engine, whose world is the launcher's: `run_deepspeed` checks it)."""
    if uses_deepspeed_engine(config.strategy, accelerator()):
        return None
    devices, num_nodes = world_from_env(config.devices, config.num_nodes)
    return devices * num_nodes if isinstance(devices, int) else None


def zero_stage(strategy: str) -> int | None:
    return int(strategy[-1]) if strategy.startswith("deepspeed_stage_") else None


def uses_deepspeed_engine(strategy: str, on: str) -> bool:  # ZeRO where Lightning refuses it (CPU)
    return zero_stage(strategy) is not None and on == "cpu"


def world_from_env(devices, num_nodes: int) -> tuple[int | str, int]:
    """Devices per node and nodes: what an outside launcher (torchrun, deepspeed) started wins."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")  # torchrun / deepspeed
    if local:
        world = int(os.environ.get("WORLD_SIZE", local))
        if "RANK" in os.environ and not (os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK")):
            # deepspeed's launcher sets no node rank: Lightning would take every node for node 0 and give ranks
            # 0..local-1 on each (and write them back to RANK), so a multi-node start hangs or collides
            os.environ["NODE_RANK"] = os.environ.get("CROSS_RANK") or str(int(os.environ["RANK"]) // int(local))
        return int(local), max(1, world // int(local))
    if devices == "auto" and accelerator() == "cpu":
        return 1, num_nodes
    return devices, num_nodes


def lightning_strategy(strategy: str, offload: bool, layer_classes: set[type] = frozenset()):
    """The Lightning strategy object (or name) for `strategy` on GPUs, or on CPU for auto/ddp."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    stage = zero_stage(strategy)
    if stage is not None:
        return DeepSpeedStrategy(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3)
    if strategy == "fsdp":
        # One FSDP unit per decoder layer; use_orig_params lets frozen and trainable weights mix (LoRA).
        return FSDPStrategy(auto_wrap_policy=set(layer_classes) or None, use_orig_params=True,
                            cpu_offload=offload, state_dict_type="full")
    if strategy == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    return "auto"


# ---------------------------------------------------------------- optimizer and schedule

def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """LR factor per optimizer step: linear warm-up to 1, then cosine down to `min_lr_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def adamw_warmup_cosine(params, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                        min_lr_ratio: float, cpu_adam: bool = False) -> dict:
    """Lightning's `configure_optimizers` answer: AdamW stepped by `warmup_cosine` every optimizer step.

    `cpu_adam`: DeepSpeed's CPU AdamW, which ZeRO-Offload requires (a C++ op built on first use)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise SlimlmError("nothing to train: every parameter is frozen.")
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        opt = DeepSpeedCPUAdam(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, max_steps, min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------- data order

class StepBatches:
    """Batch `i` of this rank is a fixed function of (seed, i, rank, world), so a run resumes exactly.

    `data` maps names to tensors of N rows. Global sample position p is row perm_e[p % N] of epoch
    e = p // N (perm_e seeded by seed + e); rank r takes positions (i*world + r)*B + [0, B).
    Iteration starts at batch `start`: a resumed run passes the batches already consumed.
    """

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, num_batches: int,
                 rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        self.data, self.batch_size, self.num_batches = data, batch_size, num_batches
        self.rank, self.world, self.seed, self.start = rank, world, seed, start
        self.n = len(next(iter(data.values())))
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return (self.batch(i) for i in range(self.start, self.num_batches))

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        first = (i * self.world + self.rank) * self.batch_size
        rows = [self._row(p) for p in range(first, first + self.batch_size)]
        return {k: v[rows] for k, v in self.data.items()}  # each [B, ...]

    def _row(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._perms:  # keep one epoch's permutation
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][k])


def step_datamodule(data: dict[str, torch.Tensor], batch_size: int, num_batches: int, seed: int, start: int):
    """A LightningDataModule whose loader is `StepBatches` for the rank Lightning assigns."""
    import lightning as L

    class _Data(L.LightningDataModule):
        def train_dataloader(self):
            t = self.trainer
            return StepBatches(data, batch_size, num_batches, t.global_rank, t.world_size, seed, start)

    return _Data()


# ---------------------------------------------------------------- checkpoints

def find_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest complete checkpoint folder in `ckpt_dir` and its meta, or None."""
    for name in ("last", "last.old"):  # last.old exists only if a run died while publishing
        meta = Path(ckpt_dir) / name / "meta.json"
        if meta.is_file():
            return meta.parent, json.loads(meta.read_text())
    return None


def save_checkpoint(ckpt_dir: Path, meta: dict, is_zero: bool, barrier, write) -> None:
    """Every rank calls `write(folder / "state.ckpt")` into a fresh temporary folder; rank 0 then adds
    `meta.json` and renames the folder to `ckpt_dir/last`, so `last` is always complete."""
    tmp, final, old = ckpt_dir / ".tmp-last", ckpt_dir / "last", ckpt_dir / "last.old"
    if is_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp / "state.ckpt")  # every rank: sharded strategies write their own part
    barrier()
    if is_zero:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def checkpoint_callback(ckpt_dir: str | os.PathLike, every: int, meta: dict):
    """A Lightning callback: every `every` optimizer steps (and at the end) publish `last/`."""
    import lightning as L

    class PeriodicCheckpoint(L.Callback):
        def __init__(self):
            self.dir, self.saved = Path(ckpt_dir), -1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if every and step and step % every == 0 and step != self.saved:
                self.save(trainer)

        def on_train_end(self, trainer, pl_module):
            if trainer.global_step != self.saved:
                self.save(trainer)

        def save(self, trainer):
            save_checkpoint(self.dir, {**meta, "global_step": trainer.global_step, "world_size": trainer.world_size},
                            trainer.is_global_zero,
                            trainer.strategy.barrier, lambda path: trainer.save_checkpoint(path, weights_only=False))
            self.saved = trainer.global_step

    return PeriodicCheckpoint()


# ---------------------------------------------------------------- logging

def progress_bar():
    from lightning.pytorch.callbacks import TQDMProgressBar

    class Bar(TQDMProgressBar):  # shows the loss, not the logger's version string
        def get_metrics(self, trainer, pl_module):
            return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
    return Bar()


def progress_lines(every_s: float = 30.0):
    """Where stderr is no terminal (a log file, a pipeline's per-variant log): a plain line each tenth of the
    steps or `every_s` seconds, where a bar would write one ever-growing line of carriage returns."""
    import lightning as L

    class Lines(L.Callback):
        def __init__(self):
            self.last = (-1, time.monotonic())  # (tenths, time) of the last line

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step, total = trainer.global_step, trainer.max_steps
            tenths = 10 * step // total if total > 0 else 0
            if trainer.is_global_zero and (tenths > self.last[0] or time.monotonic() - self.last[1] > every_s):
                self.last = (tenths, time.monotonic())
                loss = trainer.progress_bar_metrics.get("loss")
                print(f"training: step {step}/{total}" + (f", loss {float(loss):.4f}" if loss is not None else ""),
                      file=sys.stderr, flush=True)
    return Lines()


def loggers(log_dir: str | os.PathLike, name: str) -> list:
    """CSV (`<log_dir>/<name>/csv/metrics.csv`) and TensorBoard (`<log_dir>/<name>/tb`) in fixed folders:
    a resumed run appends (rows a killed run logged after its last checkpoint stay, and repeat)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out = [CSVLogger(log_dir, name=name, version="csv")]
    _keep_csv_history(out[0])
    with contextlib.suppress(ModuleNotFoundError):  # no tensorboard (nor tensorboardX): CSV alone
        out.append(TensorBoardLogger(log_dir, name=name, version="tb", default_hp_metric=False))
    return out


class StepLog:
    """The training log of both paths (Lightning's and DeepSpeed's engine): per optimizer step, the mean of its
    micro-batches' records and the learning rate the step used, written at steps `log_every`, 2 x `log_every`,
    ... and the last one, numbered from 1 (the checkpoints' and the history's step). A key that a step lacks
    after an earlier step (or the resumed run's history) had it, an idle early exit, is NaN, not a stale value."""

    def __init__(self, logs: list, log_every: int, max_steps: int, history: list[dict] = ()):
        self.logs, self.every, self.max_steps = logs, log_every, max_steps
        self.sums: dict[str, tuple[float, int]] = {}  # key -> (sum, micro-batches that had it)
        self.known: set[str] = {k for rec in history for k in rec if k != "step"}

    def add(self, parts: dict) -> None:
        for k, v in parts.items():
            if k != "step":
                total, n = self.sums.get(k, (0.0, 0))
                self.sums[k] = (total + float(v), n + 1)

    def end_step(self, step: int, lr: float | None) -> dict:
        """Close optimizer step `step`; returns its metrics (`train/<key>`, `lr-AdamW`)."""
        means = {k: total / n for k, (total, n) in self.sums.items()}
        self.known |= set(means)
        metrics = {f"train/{k}": means.get(k, float("nan")) for k in sorted(self.known)}
        if lr is not None:
            metrics["lr-AdamW"] = lr
        self.sums = {}
        if step % self.every == 0 or step == self.max_steps:
            for lg in self.logs:
                lg.log_metrics(metrics, step=step)
                lg.save()  # on disk now: a killed run keeps what it logged
        return metrics


def step_log_callback(log_every: int, max_steps: int):
    """A Lightning callback that keeps `StepLog` from the module's `history` (its last record is the micro-batch
    that just ran); the modules log nothing through Lightning itself, whose rows are numbered from 0, hold the
    last micro-batch's loss rather than the step's, and miss the last step when `log_every` does not divide it."""
    import lightning as L

    class Log(L.Callback):
        def __init__(self):
            self.log, self.lr, self.seen = None, None, None

        def on_train_start(self, trainer, pl_module):
            self.log = StepLog(list(trainer.loggers) if trainer.is_global_zero else [], log_every, max_steps,
                               pl_module.history)
            self.seen = trainer.global_step

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves after it)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.log.add(pl_module.history[-1])
            if trainer.global_step != self.seen:  # this micro-batch ended an optimizer step
                self.seen = trainer.global_step
                self.log.end_step(trainer.global_step, self.lr)
    return Log()


def _keep_csv_history(logger) -> None:
    """Lightning's CSV writer deletes the metrics.csv it finds when it starts; put it back, with its columns, so
    the run appends to it (the writer rewrites the header itself when new columns come)."""
    import csv
    import io
    import warnings

    from lightning.pytorch.utilities import rank_zero_only

    path = Path(logger.log_dir) / "metrics.csv"
    if rank_zero_only.rank != 0 or not path.is_file():
        return
    old = path.read_text()
    with warnings.catch_warnings():  # its "previous log files will be deleted": not so
        warnings.simplefilter("ignore")
        writer = logger.experiment  # made now: this is where the file goes
    path.write_text(old)
    writer.metrics_keys = sorted(next(csv.reader(io.StringIO(old)), []))


# ---------------------------------------------------------------- DeepSpeed's engine (CPU ZeRO)

def init_deepspeed_distributed() -> tuple[int, int]:
    """Start DeepSpeed's process group on gloo (CPU); a plain `python` run becomes a world of one."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Its shared-memory collective compiles a C++ op on CPU (~35 s, or a failure without a compiler);
    # gloo alone is enough at this scale.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if accelerator() == "cpu" else "nccl")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(stage: int, offload: bool, micro_batch: int, grad_accum: int, grad_clip: float,
                     precision: str) -> dict:
    zero: dict = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip, "zero_optimization": zero, "bf16": {"enabled": precision == "bf16"},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def run_deepspeed(module, data: dict[str, torch.Tensor], ds_config: dict, max_steps: int, seed: int,
                  ckpt_dir: Path, every: int, meta: dict, resume: bool, log_dir: Path, name: str,
                  log_every: int = 1, progress: bool = True):
    """Train `module` with DeepSpeed's engine for `max_steps` optimizer steps: the same data order,
    schedule, logs and checkpoint layout as the Lightning path. Returns `(engine, history)`, history
    holding this rank's per-micro-batch losses (see `per_step`)."""
    import deepspeed

    from slimlm.toolkit.eval._common import progress_bar as logged_progress  # plain lines in a log file

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    opt = module.configure_optimizers()
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt["optimizer"], config=ds_config,
                                           lr_scheduler=opt["lr_scheduler"]["scheduler"])
    step, history = 0, []
    found = find_checkpoint(ckpt_dir) if resume else None
    check_resume(found, world, max_steps)
    if found:
        # DeepSpeed unpickles its own files here (weights_only=False): trusted local state only.
        _, client = engine.load_checkpoint(str(found[0]), tag="state.ckpt")
        step, history = found[1]["global_step"], list((client or {}).get("history", []))
    accum = ds_config["gradient_accumulation_steps"]
    batches = StepBatches(data, ds_config["train_micro_batch_size_per_gpu"], max_steps * accum, rank, world,
                          seed, start=step * accum)
    logs = loggers(log_dir, name) if rank == 0 else []
    log = StepLog(logs, log_every, max_steps, history)
    engine.train()
    with logged_progress(progress and rank == 0) as bar, stop_with_resume_hint(name, ckpt_dir, lambda: step, rank == 0):
        task = bar.add_task("training", total=max_steps, completed=step)
        for i, batch in enumerate(batches, start=step * accum):
            loss, parts = engine(batch)
            engine.backward(loss)
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in step())
            engine.step()
            history.append({"step": step + 1, **parts})
            log.add(parts)
            if (i + 1) % accum:
                continue
            step += 1
            metrics = log.end_step(step, lr)
            bar.update(task, completed=step, description=f"training loss {metrics['train/loss']:.4f}")
            if (every and step % every == 0) or step == max_steps:
                save_checkpoint(ckpt_dir, {**meta, "global_step": step, "world_size": world}, rank == 0,
                                torch.distributed.barrier,
                                lambda path: engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False,
                                                                    client_state={"history": history}))
    for lg in logs:
        lg.finalize("success")
    return engine, history


def fit(module, model, data: dict[str, torch.Tensor], config, on: str, stage: int | None, ckpt_dir: Path, meta: dict,
        resume: bool, log_dir: Path, name: str, found: tuple[Path, dict] | None, start_step: int):
    """Train `module` for `config.max_steps`: DeepSpeed's own engine where Lightning refuses ZeRO (CPU), else a
    Lightning Trainer with `config.strategy`, checkpoints every `config.checkpoint_every` steps (`meta` in
    each), CSV/TensorBoard logs under `log_dir/name`, resuming from `found` at `start_step`.

    `config` carries the recipes' shared fields (strategy, offload, devices, num_nodes, batch_size,
    grad_accum, grad_clip, precision, max_steps, seed, checkpoint_every, log_every, progress).
    Returns (per-call history, is rank 0, final step, the Trainer or None).
    """
    import lightning as L

    if uses_deepspeed_engine(config.strategy, on):
        rank, _ = init_deepspeed_distributed()
        ds_config = deepspeed_config(stage, config.offload, config.batch_size, config.grad_accum,
                                     config.grad_clip, config.precision)
        engine, history = run_deepspeed(module, data, ds_config, config.max_steps, config.seed, ckpt_dir,
                                        config.checkpoint_every, meta, resume, log_dir, name,
                                        config.log_every, config.progress)
        return history, rank == 0, engine.global_steps, None
    devices, num_nodes = world_from_env(config.devices, config.num_nodes)
    bar = config.progress and sys.stderr.isatty()  # else plain lines (`progress_lines`)
    layer_classes = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    trainer = L.Trainer(accelerator=on, devices=devices, num_nodes=num_nodes,
                        strategy=lightning_strategy(config.strategy, config.offload, layer_classes),
                        precision=PRECISIONS[config.precision], max_steps=config.max_steps, max_epochs=-1,
                        accumulate_grad_batches=config.grad_accum, gradient_clip_val=config.grad_clip or None,
                        logger=loggers(log_dir, name), log_every_n_steps=config.log_every,
                        callbacks=[step_log_callback(config.log_every, config.max_steps),
                                   checkpoint_callback(ckpt_dir, config.checkpoint_every, meta),
                                   *([progress_bar()] if bar else [progress_lines()] if config.progress else [])],
                        enable_checkpointing=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        enable_progress_bar=bar, enable_model_summary=False)
    check_resume(found, trainer.world_size, config.max_steps)
    datamodule = step_datamodule(data, config.batch_size, config.max_steps * config.grad_accum,
                                 config.seed, start_step * config.grad_accum)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(found[0] / "state.ckpt") if found else None,
                    weights_only=True)
    except SIGTERMException:  # a SystemExit with no code, i.e. exit status 0: a stopped run must not look done
        stopped(name, ckpt_dir, trainer.global_step, trainer.is_global_zero, 143)
    except SystemExit:
        if not trainer.interrupted:
            raise
        # Ctrl-C: Lightning catches it inside fit and exits 1 with its message silenced (quiet_libraries)
        stopped(name, ckpt_dir, trainer.global_step, trainer.is_global_zero, 130)
    return module.history, trainer.is_global_zero, trainer.global_step, trainer


def stopped(name: str, ckpt_dir: Path, step: int, say: bool, code: int):
    """End a run that SIGTERM (exit 143, as a shell reports a process the signal ended; a scheduler's
    preemption) or Ctrl-C (130) stopped: one line with the step and how to continue, nothing exported."""
    if say:
        how = "stopped by SIGTERM" if code == 143 else "interrupted"
        found = find_checkpoint(ckpt_dir)
        then = (f"Run again with --resume to continue from the checkpoint at step {found[1]['global_step']} in "
                f"{ckpt_dir}." if found else "No checkpoint was written yet (checkpoint_every); a run again starts "
                "at step 0.")
        print(f"{name.replace('_', '-')}: {how} at step {step}; nothing exported. {then}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


class _Terminated(BaseException):  # as KeyboardInterrupt: no `except Exception` on the way swallows it
    pass


@contextlib.contextmanager
def stop_with_resume_hint(name: str, ckpt_dir: Path, step, say: bool):
    """Around DeepSpeed's training loop (Lightning's path has its own handling): SIGTERM and Ctrl-C end the run
    through `stopped` at the step `step()` reports, where SIGTERM's default would end it with no word."""
    main_thread = threading.current_thread() is threading.main_thread()

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)  # a second one ends it at once
        raise _Terminated()

    before = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    except _Terminated:
        stopped(name, ckpt_dir, step(), say, 143)
    except KeyboardInterrupt:
        stopped(name, ckpt_dir, step(), say, 130)
    finally:
        if main_thread and before is not None:
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def gathered(module, stage: int | None):
    """Inside, every parameter of `module` is whole on every rank (ZeRO-3 partitions them)."""
    if stage != 3:
        yield
        return
    import deepspeed  # `deepspeed.zero` is an attribute of the package, not a module `from ... import` can find

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
