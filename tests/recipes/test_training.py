"""recipes/training.py: data order, schedule, checkpoint publishing, strategy checks (no training here)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from slimlm.recipes import training as T
from slimlm.toolkit.errors import SlimlmError


def rows(n=10):
    return {"x": torch.arange(n), "y": torch.arange(n) * 10}


def test_step_batches_cover_each_epoch_once_and_reshuffle():
    b = T.StepBatches(rows(10), batch_size=5, num_batches=4, seed=3)
    seen = [batch["x"].tolist() for batch in b]
    assert len(seen) == 4
    assert sorted(seen[0] + seen[1]) == list(range(10))  # epoch 0: a permutation
    assert sorted(seen[2] + seen[3]) == list(range(10))  # epoch 1: another one
    assert seen[0] + seen[1] != seen[2] + seen[3]
    for batch in T.StepBatches(rows(10), 5, 4, seed=3):
        assert torch.equal(batch["y"], batch["x"] * 10)  # rows stay aligned across keys


def test_step_batches_resume_and_ranks():
    full = [b["x"].tolist() for b in T.StepBatches(rows(12), 2, 6, seed=1)]
    resumed = [b["x"].tolist() for b in T.StepBatches(rows(12), 2, 6, seed=1, start=4)]
    assert resumed == full[4:]
    r0 = [b["x"].tolist() for b in T.StepBatches(rows(12), 2, 3, rank=0, world=2, seed=1)]
    r1 = [b["x"].tolist() for b in T.StepBatches(rows(12), 2, 3, rank=1, world=2, seed=1)]
    # two ranks together see what one rank of twice the batch count sees, without overlap
    assert sum(r0 + r1, []) != [] and sorted(sum(r0 + r1, [])) == sorted(sum(full, []))
    assert r0[0] == full[0] and r1[0] == full[1]
    assert [b["x"].tolist() for b in T.StepBatches(rows(12), 2, 6, seed=2)] != full


def test_warmup_cosine_shape():
    f = T.warmup_cosine(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 15)]
    assert values == sorted(values, reverse=True)


def test_adamw_warmup_cosine_trains_only_trainable_and_refuses_none():
    lin = torch.nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    out = T.adamw_warmup_cosine(lin.parameters(), lr=1.0, weight_decay=0.0, warmup_steps=2, max_steps=4,
                                min_lr_ratio=0.0)
    opt = out["optimizer"]
    assert [p for g in opt.param_groups for p in g["params"]] == [lin.weight]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warm-up step 0
    lin.weight.requires_grad_(False)
    with pytest.raises(SlimlmError, match="frozen"):
        T.adamw_warmup_cosine(lin.parameters(), 1.0, 0.0, 1, 2, 0.0)


def test_per_step_averages_micro_batches():
    hist = [{"step": 1, "loss": 2.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 1.0, }]
    assert T.per_step(hist) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.0}]
    assert T.per_step([]) == []


def test_checkpoint_is_published_whole(tmp_path):
    calls = []

    def write(path):
        path.write_text("state")
        calls.append(path)

    assert T.find_checkpoint(tmp_path) is None
    T.save_checkpoint(tmp_path, {"global_step": 5}, True, lambda: None, write)
    T.save_checkpoint(tmp_path, {"global_step": 10}, True, lambda: None, write)
    folder, meta = T.find_checkpoint(tmp_path)
    assert folder == tmp_path / "last" and meta["global_step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary or old folder left
    assert (folder / "state.ckpt").read_text() == "state"


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    T.save_checkpoint(tmp_path, {"global_step": 5}, True, lambda: None, lambda p: p.write_text("five"))

    def crash(path):
        path.write_text("half")
        raise KeyboardInterrupt  # stands in for a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(tmp_path, {"global_step": 10}, True, lambda: None, crash)
    folder, meta = T.find_checkpoint(tmp_path)
    assert meta["global_step"] == 5 and (folder / "state.ckpt").read_text() == "five"
    # a death between the two renames leaves only last.old: still found
    (tmp_path / "last").rename(tmp_path / "last.old")
    assert T.find_checkpoint(tmp_path)[1]["global_step"] == 5
    # and the next save cleans up after it
    T.save_checkpoint(tmp_path, {"global_step": 15}, True, lambda: None, lambda p: p.write_text("15"))
    assert json.loads((tmp_path / "last" / "meta.json").read_text())["global_step"] == 15


def test_non_zero_ranks_only_write_their_part(tmp_path):
    (tmp_path / ".tmp-last").mkdir()
    T.save_checkpoint(tmp_path, {"global_step": 1}, False, lambda: None, lambda p: p.write_text("rank1"))
    assert T.find_checkpoint(tmp_path) is None  # publishing is rank 0's job


def test_strategy_checks():
    for s in T.STRATEGIES:
        if s != "fsdp":
            T.check_strategy(s, False, "cpu")
    with pytest.raises(SlimlmError) as err:
        T.check_strategy("zero2", False, "cpu")
    assert "deepspeed_stage_2" in str(err.value) and "zero2" in str(err.value)
    with pytest.raises(SlimlmError, match="GPU"):
        T.check_strategy("fsdp", False, "cpu")
    T.check_strategy("fsdp", True, "gpu")
    with pytest.raises(SlimlmError, match="offload"):
        T.check_strategy("ddp", True, "gpu")
    assert [T.zero_stage(s) for s in T.STRATEGIES] == [None, None, None, 1, 2, 3]
    assert T.uses_deepspeed_engine("deepspeed_stage_2", "cpu") and not T.uses_deepspeed_engine("deepspeed_stage_2", "gpu")
    assert not T.uses_deepspeed_engine("ddp", "cpu")


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
               "CROSS_RANK", "SLURM_PROCID", "SLURM_LOCALID")


def test_launcher_environment(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert T.env_rank() == 0 and T.env_local_rank() == 0
    assert T.world_from_env(3, 1) == (3, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher
    assert T.env_rank() == 1
    monkeypatch.setenv("RANK", "5")  # torchrun / deepspeed
    assert T.env_rank() == 5
    monkeypatch.setenv("LOCAL_SIZE", "2")  # deepspeed's launcher
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert T.world_from_env("auto", 1) == (2, 4)


def test_other_launchers_ranks(monkeypatch):
    """deepspeed's launcher sets no node rank (Lightning then took every node for node 0 and gave duplicate global
    ranks); srun sets SLURM_PROCID and SLURM_LOCALID, no RANK (every rank took itself for rank 0, its teacher to GPU 0);
    Lightning's own multi-node launch sets NODE_RANK and LOCAL_RANK only."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.delenv("NODE_RANK")  # recorded as absent: what the code sets below is removed after the test
    with monkeypatch.context() as env:  # deepspeed --num_nodes 2: node 1, local rank 3 of 8
        for var, value in dict(RANK="11", LOCAL_RANK="3", LOCAL_SIZE="8", WORLD_SIZE="16", CROSS_RANK="1").items():
            env.setenv(var, value)
        assert T.world_from_env("auto", 1) == (8, 2)
        assert T.os.environ["NODE_RANK"] == "1" and T.env_rank() == 11
        env.delenv("NODE_RANK")
        env.delenv("CROSS_RANK")
        T.world_from_env("auto", 1)
        assert T.os.environ["NODE_RANK"] == "1"  # from RANK // LOCAL_SIZE
    T.os.environ.pop("NODE_RANK")
    with monkeypatch.context() as env:  # torchrun names the node itself: left as it is
        for var, value in dict(RANK="11", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8", WORLD_SIZE="16", GROUP_RANK="1").items():
            env.setenv(var, value)
        T.world_from_env("auto", 1)
        assert "NODE_RANK" not in T.os.environ
    with monkeypatch.context() as env:  # srun
        env.setenv("SLURM_PROCID", "11")
        env.setenv("SLURM_LOCALID", "3")
        assert T.env_rank() == 11 and T.env_local_rank() == 3
    with monkeypatch.context() as env:  # Lightning's children inside `srun --pty bash`: they inherit SLURM_PROCID=0
        env.setenv("SLURM_PROCID", "0")
        env.setenv("LOCAL_RANK", "1")
        assert T.env_rank() == 1
    with monkeypatch.context() as env:  # Lightning's own launch, second node, its first process
        env.setenv("NODE_RANK", "1")
        assert T.env_rank() != 0
        env.setenv("NODE_RANK", "0")
        env.setenv("LOCAL_RANK", "0")
        assert T.env_rank() == 0


def test_rank_zero_first(tmp_path):
    target = tmp_path / "made"
    T.rank_zero_first(target, lambda: target.write_text("x"), rank=0)
    assert target.read_text() == "x"
    T.rank_zero_first(target, lambda: pytest.fail("made twice"), rank=0)  # exists: not made again
    T.rank_zero_first(target, lambda: pytest.fail("rank 1 must not make it"), rank=1)
    with pytest.raises(SlimlmError, match="waited"):
        T.rank_zero_first(tmp_path / "never", lambda: None, rank=1, timeout_s=0.5)


def test_launch_arguments_accept_deepspeeds_local_rank():
    import argparse

    p = T.add_launch_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--local_rank=1", "--config", "c.yaml", "a=1", "b.c=x", "--resume"])
    assert args.local_rank == 1 and args.overrides == ["a=1", "b.c=x"] and args.resume


def test_a_resume_must_continue_the_run(tmp_path):
    """Another number of processes would skip or repeat samples; a checkpoint past max_steps has nothing to do.
    Checkpoints written before world_size was recorded resume as before."""
    found = (tmp_path, {"global_step": 12, "world_size": 1})
    T.check_resume(None, 4, 1)
    T.check_resume(found, 1, 12)  # equal: export again
    T.check_resume((tmp_path, {"global_step": 12}), 2, 20)
    with pytest.raises(SlimlmError, match=r"written by 1 process\(es\); this run has 2"):
        T.check_resume(found, 2, 20)
    with pytest.raises(SlimlmError, match="at step 12, past max_steps=4"):
        T.check_resume(found, 1, 4)


def test_a_resume_refuses_settings_that_decide_what_the_checkpoint_holds(tmp_path):
    """LoRA adapters, a hidden-state aligner and the strategy's checkpoint form (a Lightning file, a DeepSpeed folder)
    changed between runs failed inside the checkpoint load (hundreds of state-dict keys, an empty AssertionError)."""
    from slimlm.recipes.config import to_dict
    from slimlm.recipes.distill import RESUME_KEYS, DistillConfig, LoraConfig, LossConfig

    first = DistillConfig(lora=LoraConfig(enabled=True, rank=4))
    found = (tmp_path, {"global_step": 6, "world_size": 1, "config": to_dict(first)})
    T.check_resume(found, 1, 8, DistillConfig(lora=LoraConfig(enabled=True, rank=4), lr=1e-3), RESUME_KEYS)
    for changed, words in ((DistillConfig(lora=LoraConfig(enabled=True, rank=8)), "lora differ"),
                           (DistillConfig(lora=LoraConfig(enabled=True, rank=4), loss=LossConfig(hidden_layers=2)),
                            "loss.hidden_layers differ .*loss.hidden_layers: 0 there, 2 now"),
                           (DistillConfig(lora=LoraConfig(enabled=True, rank=4), strategy="deepspeed_stage_2"),
                            "strategy differ .*'auto' there, 'deepspeed_stage_2' now")):
        with pytest.raises(SlimlmError, match=f"cannot resume: {words}"):
            T.check_resume(found, 1, 8, changed, RESUME_KEYS)
    # auto and ddp write the same Lightning file: either resumes the other
    T.check_resume(found, 1, 8, DistillConfig(lora=LoraConfig(enabled=True, rank=4), strategy="ddp"), RESUME_KEYS)
    # LoRA off on both sides: its other settings change nothing
    off = (tmp_path, {"global_step": 6, "world_size": 1, "config": to_dict(DistillConfig())})
    T.check_resume(off, 1, 8, DistillConfig(lora=LoraConfig(rank=8)), RESUME_KEYS)


@pytest.mark.parametrize("debug", [False, True])
def test_a_script_reports_a_bug_briefly_unless_debug(debug, capsys, monkeypatch):
    """`python recipes/X.py` runs as `slimlm X`: an internal error in one line (exit 1); --debug raises; the
    overrides after --resume reach the recipe."""
    from slimlm.recipes import cli, distill

    seen = []

    def run(args):
        seen.append(args.overrides)
        raise ValueError("boom")

    monkeypatch.setitem(cli.VERBS, "distill", (cli.VERBS["distill"][0], run))
    argv = ["--config", "c.yaml", "a=1", "--resume", "b=2", *(["--debug"] if debug else [])]
    if debug:
        with pytest.raises(ValueError, match="boom"):
            distill.cli(argv)
    else:
        assert distill.cli(argv) == 1
        assert "slimlm distill: internal error: ValueError: boom" in capsys.readouterr().err
    assert seen == [["a=1", "b=2"]]


def test_a_resumed_run_appends_to_the_csv_log(tmp_path):
    # Lightning's CSV writer deletes a metrics.csv it finds; the training history of a resumed run must stay.
    first = T.loggers(tmp_path, "run")[0]
    first.log_metrics({"loss": 2.0}, step=1)
    first.save()
    resumed = T.loggers(tmp_path, "run")[0]
    resumed.log_metrics({"loss": 1.5, "lr": 0.1}, step=2)  # a new column too: the header grows
    resumed.save()
    rows = list(__import__("csv").DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    assert [(r["step"], r["loss"], r.get("lr")) for r in rows] == [("1", "2.0", ""), ("2", "1.5", "0.1")]


def test_step_log_rows_means_and_idle_keys():
    """StepLog (both training paths): rows at log_every's multiples and the last step; each key the mean over the
    micro-batches that had it; a key known from earlier steps or a resumed run's history is NaN when idle."""
    import math

    class Recorder:
        def __init__(self):
            self.rows, self.saved = [], 0

        def log_metrics(self, metrics, step):
            self.rows.append((step, metrics))

        def save(self):
            self.saved += 1

    rec = Recorder()
    log = T.StepLog([rec], log_every=2, max_steps=3, history=[{"step": 1, "loss": 9.0, "ce_1": 9.0}])
    log.add({"loss": 1.0, "ce_2": 4.0})
    log.add({"loss": 3.0})
    assert log.end_step(1, 0.1)["train/loss"] == 2.0 and rec.rows == []  # step 1: not a multiple of 2
    log.add({"loss": 1.0, "ce_2": 4.0})
    log.add({"loss": 3.0})
    log.end_step(2, 0.2)
    log.add({"loss": 5.0, "ce_1": 1.0})
    log.end_step(3, 0.3)
    assert [s for s, _ in rec.rows] == [2, 3] and rec.saved == 2
    two, three = rec.rows[0][1], rec.rows[1][1]
    assert two["train/loss"] == 2.0 and two["train/ce_2"] == 4.0 and math.isnan(two["train/ce_1"])
    assert two["lr-AdamW"] == 0.2 and three["train/ce_1"] == 1.0 and math.isnan(three["train/ce_2"])


@pytest.mark.parametrize("override, match", [
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(min_lr_ratio=-0.1), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(grad_clip=-1), "grad_clip must be >= 0"),
    (dict(checkpoint_every=-1), "checkpoint_every must be >= 0"),
    (dict(max_blocks=0), "max_blocks must be >= 1"),
    (dict(lr=0), "lr must be > 0"),
    (dict(lr=-1e-4), "lr must be > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(devices=0), "devices must be >= 1"),
    (dict(num_nodes=0), "num_nodes must be >= 1"),
    (dict(seed=-1), r"seed must be an integer in 0\.\.4294967295"),  # was: numpy's ValueError, an internal error
    (dict(seed=2**32), r"seed must be an integer in 0\.\.4294967295"),
])
def test_schedule_settings_that_would_break_training_are_refused_by_key(override, match):
    """The settings every recipe shares (each recipe's config calls check_schedule; their tests check one key
    each, before any model loads)."""
    from types import SimpleNamespace

    good = dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=0.1, grad_clip=1.0, checkpoint_every=0,
                max_blocks=None, num_nodes=1, devices="auto", seed=0)
    T.check_schedule(SimpleNamespace(**good))
    with pytest.raises(SlimlmError, match=match):
        T.check_schedule(SimpleNamespace(**{**good, **override}))


def test_context_length_reads_rope_scaling():
    from types import SimpleNamespace as NS

    assert T.context_length(NS(max_position_embeddings=8192)) == 8192
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert T.context_length(NS(max_position_embeddings=4096, rope_scaling=yarn)) == 16384  # stretched 4x
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert T.context_length(NS(max_position_embeddings=131072, rope_scaling=llama3)) == 131072  # already stretched
    assert T.context_length(NS(max_position_embeddings=2048, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e4})) == 2048
    assert T.context_length(NS()) is None and T.context_length(None) is None  # nothing to check against
