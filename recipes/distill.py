"""Knowledge distillation: a student learns a teacher's next-token distribution (or its outputs).

    python recipes/distill.py --config configs/distill/smollm2-135m.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 recipes/distill.py --config ... strategy=ddp
    deepspeed --num_gpus 2 recipes/distill.py --config ... strategy=deepspeed_stage_2
    slimlm distill --config ...

Teacher modes (`teacher_mode`):
- `logits`: the frozen teacher runs beside the student in every step (no grad) and the student
  minimises `loss.kind` (forward/reverse/skew KL, JS) on its logits, plus optional cross-entropy
  and hidden-state alignment of `loss.hidden_layers` evenly spaced layers. At `loss.kd_weight` 0
  with no hidden alignment (a plain cross-entropy baseline) the teacher's forward pass is skipped.
- `topk`: the teacher's top-k log-probs are computed once into a TopkCache (`topk.cache`, reused if
  it exists), and training reads them instead of running the teacher.
- `sequence`: sequence-level KD. The teacher generates continuations of prompts from the data with
  slimlm's serving engine, once; the student learns them with cross-entropy.

The teacher is deliberately *not* a registered submodule: DDP/DeepSpeed/FSDP neither replicate,
shard nor checkpoint it. The result is a slimlm export in `<out_dir>/model` whose manifest holds this
config, the first and final losses, and the pruned shapes of a student that came from a pruned export.
Strategies, checkpoints and logs: see training.py.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.recipes import training as T
from slimlm.recipes.config import load_config, to_dict
from slimlm.toolkit.errors import SlimlmError

TEACHER_MODES = ("logits", "topk", "sequence")
RESUME_KEYS = ("teacher", "student", "teacher_mode", "data", "data_split", "max_blocks", "seq_len",
               "batch_size", "grad_accum", "seed",  # what fixes the data order and the targets
               "lora", "loss.hidden_layers", "strategy")  # what the checkpoint holds, and how (T.check_resume)


@dataclass
class LossConfig:
    kind: str = "forward_kl"           # forward_kl | reverse_kl | skew_kl | skew_reverse_kl | js
    temperature: float = 1.0
    skew: float = 0.1
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int | None = None      # tokens per chunk of the loss (bounds [tokens, vocab] memory)
    hidden_layers: int = 0             # evenly spaced student layers aligned to the teacher's (0: off)
    hidden_weight: float = 1.0
    hidden_loss: str = "cosine"        # cosine | mse


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split())


@dataclass
class TopkConfig:
    k: int = 64
    cache: str | None = None           # folder of the cache (default <out_dir>/teacher_topk)


@dataclass
class SequenceConfig:
    prompts: int = 64                  # prompts: the first prompt_len tokens of the first packed blocks
    prompt_len: int = 32
    max_new_tokens: int = 64           # training rows are prompt_len + max_new_tokens long
    temperature: float = 0.0           # 0: greedy


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m"
    student: str = "smollm2-135m"      # a model spec; a pruned export keeps its shapes in the manifest
    teacher_mode: str = "logits"
    data: str = "builtin:wiki"
    data_split: str = "train"
    max_blocks: int | None = None      # use only the first N packed blocks
    seq_len: int = 256
    batch_size: int = 4                # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_steps: int = 100               # optimizer steps
    grad_clip: float = 1.0
    precision: str = "32"              # 32 | bf16
    seed: int = 0
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    topk: TopkConfig = field(default_factory=TopkConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    strategy: str = "auto"             # auto | ddp | fsdp | deepspeed_stage_1 | 2 | 3
    offload: bool = False              # ZeRO / FSDP offload of optimizer state (and ZeRO-3 parameters)
    devices: int | str = "auto"
    num_nodes: int = 1
    checkpoint_every: int = 50         # optimizer steps between checkpoints (0: only at the end)
    log_every: int = 10
    out_dir: str = "runs/distill"
    log_dir: str | None = None         # default <out_dir>/logs
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (big models)
    progress: bool = True
    threads: int | None = None         # torch threads per process (null: torch's); 1 on a busy shared CPU

    def __post_init__(self):
        from slimlm.toolkit.distill import KINDS

        for name, value, allowed in (("teacher_mode", self.teacher_mode, TEACHER_MODES),
                                     ("precision", self.precision, tuple(T.PRECISIONS)),
                                     ("loss.kind", self.loss.kind, KINDS),
                                     ("loss.hidden_loss", self.loss.hidden_loss, ("cosine", "mse"))):
            if value not in allowed:
                raise SlimlmError(f"unknown {name} {value!r}.", f"Expected one of: {', '.join(allowed)}.")
        T.check_strategy(self.strategy, self.offload, T.accelerator())
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimlmError(f"{name} must be at least 1, got {getattr(self, name)}.")
        T.check_schedule(self)
        T.check_loss(self, "loss.temperature", "loss.chunk_size")
        loss, seq = self.loss, self.sequence  # sections a mode does not read are checked too: a bad value is a typo
        T.refuse_bad_values(self, (
            ("loss.skew", 0 <= loss.skew <= 1, "in [0, 1] (a mixing weight)"),
            ("loss.kd_weight", loss.kd_weight >= 0, ">= 0"), ("loss.ce_weight", loss.ce_weight >= 0, ">= 0"),
            ("loss.hidden_layers", loss.hidden_layers >= 0, ">= 0 (0: off)"),
            ("loss.hidden_weight", loss.hidden_weight >= 0, ">= 0"),
            ("lora.rank", self.lora.rank >= 1, ">= 1"), ("lora.alpha", self.lora.alpha > 0, "> 0"),
            ("topk.k", self.topk.k >= 1, ">= 1 (teacher tokens kept per position)"),
            ("sequence.prompts", seq.prompts >= 1, ">= 1"),
            ("sequence.prompt_len", seq.prompt_len >= 1 and (self.teacher_mode != "sequence" or seq.prompt_len < self.seq_len),
             f">= 1, and below seq_len ({self.seq_len}) in teacher_mode=sequence (prompts are cut from its blocks)"),
            ("sequence.max_new_tokens", seq.max_new_tokens >= 1, ">= 1"),
            ("sequence.temperature", seq.temperature >= 0, ">= 0 (0: greedy)")))
        if loss.kd_weight == loss.ce_weight == 0:
            raise SlimlmError("loss.kd_weight and loss.ce_weight are both 0: nothing would be trained.",
                              "Use loss.kd_weight=1 (pure distillation) and/or loss.ce_weight > 0.")
        if self.loss.hidden_layers and self.teacher_mode != "logits":
            raise SlimlmError("loss.hidden_layers needs the teacher's hidden states: use teacher_mode=logits.")


def make_module(student, teacher, aligner, topk_cache, *, loss: LossConfig, optim: dict, vocab: int | None = None):
    """The LightningModule: `forward(batch) -> (loss, parts)`, which both training paths call.
    `vocab`: score only the first `vocab` logits of each model (see `shared_vocab`); None: all of them.
    (Defined in a function so that importing this file, e.g. for `slimlm --help`, skips Lightning.)"""
    import lightning as L

    from slimlm.toolkit.distill import distill_objective

    class DistillModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.aligner = student, aligner  # registered: they train and are checkpointed
            object.__setattr__(self, "teacher", teacher)   # not registered: never sharded or saved; on its device
            self.history: list[dict] = []

        def forward(self, batch):
            ids, labels = batch["input_ids"], batch["labels"]  # [B, T] each
            hidden = self.aligner is not None
            out = self.student(input_ids=ids, output_hidden_states=hidden, use_cache=False)
            logits = out.logits[..., :vocab] if vocab else out.logits  # [B, T, V]
            target, kd_w, ce_w = None, loss.kd_weight, loss.ce_weight
            if self.teacher is not None:
                # At kd_weight 0 without hidden alignment nothing reads the teacher: skip its forward.
                if kd_w > 0 or hidden:
                    with torch.no_grad():
                        t_out = self.teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
                    target = t_out.logits[..., :vocab] if vocab else t_out.logits  # [B, T, V]
            elif topk_cache is not None:  # one cached batch per training row
                got = [topk_cache.get(int(r), ids[i:i + 1].cpu()) for i, r in enumerate(batch["row"])]
                target = tuple(torch.cat(x).to(ids.device) for x in zip(*got))  # values, indices: [B, T, k]
            else:  # sequence-level KD: plain cross-entropy on the teacher's text
                kd_w, ce_w = 0.0, 1.0
            total, parts = distill_objective(logits, target, labels, kd_weight=kd_w, ce_weight=ce_w,
                                             kind=loss.kind, temperature=loss.temperature, skew=loss.skew,
                                             chunk_size=loss.chunk_size)
            if hidden:
                h = self.aligner(out.hidden_states, t_out.hidden_states, mask=labels != -100)
                total = total + loss.hidden_weight * h
                parts = {**parts, "hidden": h.detach(), "loss": total.detach()}
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
            checkpoint["slimlm_history"] = self.history  # floats and ints: weights_only-safe

        def on_load_checkpoint(self, checkpoint):
            self.history = list(checkpoint.get("slimlm_history", []))

    return DistillModule()


# ---------------------------------------------------------------- models and data

def load_student(config: DistillConfig):
    from slimlm.toolkit.models import load

    student, tokenizer = load(config.student, dtype="float32")
    if config.gradient_checkpointing:  # transformers 5 renamed it; non-reentrant works with frozen inputs (LoRA)
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.enabled:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        try:
            student = get_peft_model(student, PeftLora(r=config.lora.rank, lora_alpha=config.lora.alpha,
                                                       target_modules=config.lora.targets, lora_dropout=0.0))
        except ValueError as err:
            raise SlimlmError(f"LoRA: {err}", "Set lora.targets to module names the student has.") from err
    return student.train(), tokenizer


def shared_vocab(student, teacher, tokenizer, mode: str) -> int | None:
    """The logit columns to compare when the two models' vocabularies differ in size (one embedding matrix
    padded past the shared tokenizer, e.g. to a multiple of 64): the tokenizer's ids, `len(tokenizer)`.
    None where the sizes agree, or in sequence mode (the student learns the teacher's text, not its logits)."""
    s_v = student.get_output_embeddings().weight.shape[0]
    t_v = teacher.get_output_embeddings().weight.shape[0]
    if s_v == t_v or mode == "sequence":
        return None
    n = len(tokenizer)
    if min(s_v, t_v) < n:
        raise SlimlmError(f"the student scores {s_v} tokens and the teacher {t_v}, but their tokenizer has {n}.",
                          "Both models need an output row for every token of the tokenizer.")
    if mode == "topk":  # the cached ids index the student's logits: they must exist there
        if t_v > s_v:
            raise SlimlmError(f"teacher_mode=topk needs a student with at least the teacher's {t_v} output rows; "
                              f"it has {s_v} (the tokenizer has {n}).",
                              "Use teacher_mode=logits, which compares the tokenizer's ids only.")
        return None
    return n


def build_data(config: DistillConfig, tokenizer, teacher, rank: int, out: Path) -> dict[str, torch.Tensor]:
    """Training rows: `input_ids` and `labels` [N, T] (+ `row` [N] for the top-k cache)."""
    from slimlm.toolkit.data import load_texts, pack

    blocks = pack(load_texts(config.data, split=config.data_split, tokenizer=tokenizer), tokenizer, config.seq_len)
    blocks = blocks[:config.max_blocks]  # [N, T]
    if config.teacher_mode == "sequence":
        from safetensors.torch import load_file

        path = out / f"sequence_kd-{targets_key(config)}.safetensors"
        T.rank_zero_first(path, lambda: write_sequences(teacher, tokenizer, blocks, config.sequence, config.seed, path), rank)
        return load_file(path)
    return {"input_ids": blocks, "labels": blocks.clone(), "row": torch.arange(len(blocks))}


def targets_key(config: DistillConfig) -> str:
    """A short hash of what the teacher's one-off targets depend on (names their file)."""
    import hashlib
    import json

    keys = ("teacher", "data", "data_split", "max_blocks", "seq_len", "seed", "sequence", "topk")
    return hashlib.sha256(json.dumps({k: to_dict(config)[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


def write_sequences(teacher, tokenizer, blocks, seq: SequenceConfig, seed: int, path: Path) -> None:
    """The teacher continues `seq.prompts` prompts through slimlm's engine; rows are prompt + answer."""
    from safetensors.torch import save_file

    from slimlm.serve.llm import LLM
    from slimlm.serve.sampling_params import SamplingParams

    if seq.prompt_len >= blocks.shape[1]:
        raise SlimlmError(f"sequence.prompt_len {seq.prompt_len} must be shorter than seq_len {blocks.shape[1]}.")
    if seq.prompts > len(blocks):
        print(f"distill: note: sequence.prompts is {seq.prompts} but the data gives {len(blocks)} blocks of "
              f"seq_len {blocks.shape[1]} tokens; the teacher continues {len(blocks)} prompts (more text, a smaller "
              "seq_len or a larger max_blocks gives more)", file=sys.stderr)
    prompts = blocks[:seq.prompts, :seq.prompt_len].tolist()
    try:
        llm = LLM(teacher, tokenizer=tokenizer, max_num_seqs=len(prompts),
                  max_model_len=seq.prompt_len + seq.max_new_tokens + 1)
    except ValueError as err:  # the teacher cannot be served so (e.g. a sliding window shorter than that)
        raise SlimlmError(f"cannot generate with the teacher: {err}.",
                          "Lower sequence.prompt_len or sequence.max_new_tokens.") from err
    outs = llm.generate(prompts, SamplingParams(max_tokens=seq.max_new_tokens, temperature=seq.temperature, seed=seed),
                        progress=True)
    width = seq.prompt_len + seq.max_new_tokens
    ids = torch.full((len(prompts), width), tokenizer.eos_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)  # loss only on the teacher's answer
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        answer = out.outputs[0].token_ids
        ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer, dtype=torch.long)
    tmp = path.with_suffix(".tmp")
    save_file({"input_ids": ids, "labels": labels, "row": torch.arange(len(ids))}, str(tmp))
    os.replace(tmp, path)  # other ranks wait for `path`: it must appear complete


def open_topk_cache(config: DistillConfig, teacher, data, rank: int, out: Path):
    from slimlm.toolkit.distill import TopkCache, write_topk_cache

    folder = Path(config.topk.cache or out / f"teacher_topk-{targets_key(config)}")
    rows = (data["input_ids"][i:i + 1] for i in range(len(data["input_ids"])))  # one row per cached batch
    T.rank_zero_first(folder / "topk_index.json",
                      lambda: write_topk_cache(teacher, rows, folder, k=config.topk.k, progress=config.progress), rank)
    return TopkCache(folder)


# ---------------------------------------------------------------- the run

def main(config: DistillConfig, resume: bool = False) -> Path:
    """Distil `config.teacher` into `config.student`; returns the export folder (on every rank)."""
    import lightning as L

    from slimlm.toolkit.distill import HiddenAligner, check_same_tokenizer
    from slimlm.toolkit.export import kept_transforms, write
    from slimlm.toolkit.models import load, resolve

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
        print(f"distill: no checkpoint in {ckpt_dir} yet; starting at step 0", file=sys.stderr)
    resolve(config.student)
    resolve(config.teacher)
    T.check_data(config)
    for spec in (config.student, config.teacher):
        T.check_context(config, spec, ("seq_len",))
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    student, tokenizer = load_student(config)
    # Straight onto this rank's GPU: eight ranks holding an 8B teacher in host memory first add up.
    device = f"cuda:{T.env_local_rank()}" if on == "gpu" else "cpu"
    teacher, teacher_tok = load(config.teacher, dtype="bf16" if config.precision == "bf16" else "float32", device=device)
    check_same_tokenizer(teacher_tok, tokenizer)
    vocab = shared_vocab(student, teacher, tokenizer, config.teacher_mode)
    teacher.requires_grad_(False)
    data = build_data(config, tokenizer, teacher, rank, out)
    topk_cache = open_topk_cache(config, teacher, data, rank, out) if config.teacher_mode == "topk" else None
    if config.teacher_mode != "logits":
        teacher = None  # its work is done and on disk: free the memory
    aligner = None
    if config.loss.hidden_layers:
        s_cfg, t_cfg = student.config, teacher.config
        aligner = HiddenAligner(s_cfg.hidden_size, t_cfg.hidden_size, student_layers=s_cfg.num_hidden_layers,
                                teacher_layers=t_cfg.num_hidden_layers, count=config.loss.hidden_layers,
                                loss=config.loss.hidden_loss)
    stage = T.zero_stage(config.strategy)
    optim = dict(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                 max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio, cpu_adam=config.offload and stage is not None)
    module = make_module(student, teacher, aligner, topk_cache, loss=config.loss, optim=optim, vocab=vocab)
    meta = {"config": to_dict(config)}
    start_step = found[1]["global_step"] if found else 0
    t0 = time.perf_counter()
    history, is_zero, final_step, trainer = T.fit(module, student, data, config, on, stage, ckpt_dir, meta, resume,
                                                  log_dir, "distill", found, start_step)

    steps = T.per_step(history)
    results = {"steps": final_step, "resumed_from": start_step, "seconds_this_run": round(time.perf_counter() - t0, 2),
               "first": steps[0] if steps else None, "final": steps[-1] if steps else None}
    manifest = {"base_model": config.student, "config": to_dict(config), "transforms": kept_transforms(config.student),
                "eval": {"distill": results}, "command": " ".join(sys.argv)}
    export_dir = out / "model"
    student = module.student
    if config.strategy == "fsdp":  # gather the full weights into a fresh copy on rank 0
        state = trainer.strategy.lightning_module_state_dict()
        if is_zero:
            student, _ = load_student(config)
            student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    with T.gathered(student, stage):  # ZeRO-3: whole weights on every rank while rank 0 writes
        if is_zero:
            write(student.merge_and_unload() if config.lora.enabled else student, tokenizer, export_dir,
                  meta=manifest, overwrite=True)
            first, final = (f"{results[k]['loss']:.4f}" if results[k] else "-" for k in ("first", "final"))
            print(f"distill: {final_step} steps, loss {first} -> {final}; wrote {export_dir}")
    T.barrier()
    return export_dir


# ---------------------------------------------------------------- command line

def add_distill(sub) -> None:
    T.add_launch_arguments(sub.add_parser("distill", help="distil a teacher into a student (logits, top-k cache or "
                                          "sequence-level KD)", description=__doc__.split("\n\n")[0]))


def run_distill(args) -> int:
    config = load_config(DistillConfig, args.config, args.overrides)
    T.run_leaving_no_empty_out_dir(config.out_dir, lambda: main(config, resume=args.resume))
    return 0


def cli(argv: list[str] | None = None) -> int:
    from slimlm.recipes.cli import run_script

    return run_script("distill", argv)


if __name__ == "__main__":
    sys.exit(cli())
