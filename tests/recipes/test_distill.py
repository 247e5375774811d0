"""recipes/distill.py in one process on tiny models: KD lowers the held-out KD loss, the export and its
manifest, weights_only checkpoints, the top-k and sequence-level modes, LoRA + hidden alignment, and
the errors a user can hit (tokenizers that differ, unknown strategy or key, resume mistakes)."""
from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
import yaml

from slimlm.recipes.config import load_config, to_dict
from slimlm.recipes.distill import DistillConfig, add_distill, cli, main, run_distill
from slimlm.toolkit.distill import kd_loss
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import read, write
from slimlm.toolkit.models import load, tiny_model

WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat and ran far away home".split()
PRUNED = {"hidden_size": 64, "num_hidden_layers": 2, "note": "test"}


def make_text(path, docs: int, seed: int):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A sharp random teacher (Qwen2-style), a different random student saved as a 'pruned' export."""
    root = tmp_path_factory.mktemp("distill")
    teacher, tok = tiny_model("qwen2", seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # peaked distributions: something definite to learn
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student, tok = tiny_model("llama", seed=2)
    write(student, tok, root / "student", meta={"transforms": {"pruned_shapes": PRUNED}})
    return {"root": root, "teacher": str(root / "teacher"), "student": str(root / "student"),
            "train": str(make_text(root / "train.txt", 60, seed=0)),
            "held_out": str(make_text(root / "held_out.txt", 10, seed=1))}


def config_file(assets, out_dir, **settings):
    base = dict(teacher=assets["teacher"], student=assets["student"], data=assets["train"], seq_len=64,
                batch_size=4, lr=3e-3, warmup_steps=2, max_steps=20, checkpoint_every=10, log_every=1,
                progress=False, out_dir=str(out_dir))
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    # Two cores shared with other jobs: OpenMP threads that spin-wait make tiny models 50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def held_out_kd(student, teacher, assets) -> float:
    from slimlm.toolkit.data import load_texts, pack

    _, tok = load(assets["teacher"])
    blocks = pack(load_texts(assets["held_out"]), tok, 64)[:8]
    with torch.no_grad():
        return float(kd_loss(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits))


@pytest.fixture(scope="module")
def kd_run(assets):
    out = assets["root"] / "kd"
    path = config_file(assets, out)
    torch.set_num_threads(1)
    export = main(load_config(DistillConfig, path, []))
    return path, out, export


def test_kd_lowers_the_held_out_kd_loss(assets, kd_run):
    _, _, export = kd_run
    teacher, _ = load(assets["teacher"])
    before, _ = load(assets["student"])
    after, _ = load(str(export))  # a verified slimlm export
    kd_before, kd_after = held_out_kd(before, teacher, assets), held_out_kd(after, teacher, assets)
    assert kd_after < 0.75 * kd_before, (kd_before, kd_after)


def test_manifest_holds_config_losses_and_pruned_shapes(assets, kd_run):
    path, out, export = kd_run
    manifest = read(export)
    assert manifest.config == to_dict(load_config(DistillConfig, path, []))
    assert manifest.transforms["pruned_shapes"] == PRUNED
    assert manifest.base_model == assets["student"]
    result = manifest.eval["distill"]
    assert result["steps"] == 20 and result["resumed_from"] == 0
    assert result["first"]["step"] == 1 and result["final"]["step"] == 20
    assert result["final"]["loss"] < 0.8 * result["first"]["loss"]
    assert result["final"]["kd"] == pytest.approx(result["final"]["loss"])  # kd_weight 1, no CE


def test_checkpoint_loads_weights_only_and_holds_no_teacher(kd_run):
    _, out, _ = kd_run
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["global_step"] == 20 and meta["world_size"] == 1  # a resume checks it (`check_resume`)
    state = torch.load(out / "checkpoints" / "last" / "state.ckpt", weights_only=True, map_location="cpu")
    keys = list(state["state_dict"])
    assert keys and all(k.startswith("student.") for k in keys)  # the frozen teacher is not saved
    assert state["global_step"] == 20 and len(state["slimlm_history"]) == 20
    assert state["optimizer_states"] and state["lr_schedulers"]


def test_csv_and_tensorboard_logs(kd_run):
    _, out, _ = kd_run
    csv = (out / "logs" / "distill" / "csv" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert "train/loss" in header and "train/kd" in header and "lr-AdamW" in header
    losses = [row.split(",")[header.index("train/loss")] for row in csv[1:]]
    assert len([x for x in losses if x]) == 20
    assert list((out / "logs" / "distill" / "tb").glob("events.out.tfevents.*"))


def test_resume_mistakes(assets, kd_run):
    path, out, _ = kd_run
    with pytest.raises(SlimlmError, match="--resume"):
        main(load_config(DistillConfig, path, []))
    with pytest.raises(SlimlmError, match="cannot resume: seq_len differ"):
        main(load_config(DistillConfig, path, ["seq_len=48"]), resume=True)
    # resuming a finished run trains nothing more and writes the same result again
    export = main(load_config(DistillConfig, path, []), resume=True)
    assert read(export).eval["distill"]["steps"] == 20


@pytest.mark.parametrize("mode, extra", [
    ("topk", ["topk.k=16"]),
    ("sequence", ["sequence.prompts=16", "sequence.prompt_len=16", "sequence.max_new_tokens=24"]),
])
def test_topk_cache_and_sequence_level_modes(assets, mode, extra):
    out = assets["root"] / mode
    config = load_config(DistillConfig, config_file(assets, out, max_steps=12, checkpoint_every=0),
                         [f"teacher_mode={mode}", *extra])
    result = read(main(config)).eval["distill"]
    assert result["steps"] == 12 and result["final"]["loss"] < 0.9 * result["first"]["loss"]
    if mode == "topk":
        (cache,) = out.glob("teacher_topk-*")
        index = json.loads((cache / "topk_index.json").read_text())
        assert index["k"] == 16 and len(index["batches"]) > 0
        assert "kd" in result["final"]
    else:
        from safetensors.torch import load_file

        (path,) = out.glob("sequence_kd-*.safetensors")
        rows = load_file(path)
        assert rows["input_ids"].shape == (16, 40)
        assert (rows["labels"][:, :16] == -100).all()  # no loss on the prompt
        answered = rows["labels"][:, 16:] != -100
        assert answered[:, 0].all()  # the teacher answered every prompt
        assert torch.equal(rows["labels"][:, 16:][answered], rows["input_ids"][:, 16:][answered])
        assert "ce" in result["final"] and "kd" not in result["final"]


def test_lora_hidden_alignment_and_checkpointing_export_merged_weights(assets):
    out = assets["root"] / "lora"
    config = load_config(DistillConfig, config_file(assets, out, max_steps=6, checkpoint_every=0),
                         ["lora.enabled=true", "lora.rank=4", "lora.targets=[q_proj, v_proj]", "lr=1e-2",
                          "loss.hidden_layers=2", "loss.hidden_loss=mse", "loss.ce_weight=0.5",
                          "gradient_checkpointing=true"])
    export = main(config)
    final = read(export).eval["distill"]["final"]
    assert {"kd", "ce", "hidden", "loss"} <= set(final)
    from safetensors.torch import load_file

    (weights,) = export.glob("*.safetensors")
    state = load_file(weights)
    assert not [k for k in state if "lora" in k]
    initial, _ = load(assets["student"])
    changed = [k for k, v in initial.state_dict().items() if k in state and not torch.equal(v, state[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only LoRA targets moved


def test_tokenizers_that_differ_are_refused(assets):
    root = assets["root"]
    teacher, tok = tiny_model("qwen2", seed=1)
    tok.add_tokens(["<extra>"])
    teacher.save_pretrained(root / "teacher_other_tok")
    tok.save_pretrained(root / "teacher_other_tok")
    out = root / "tokdiff"
    config = load_config(DistillConfig, config_file(assets, out), [f"teacher={root / 'teacher_other_tok'}"])
    with pytest.raises(SlimlmError, match="tokenizers differ"):
        main(config)
    assert not (out / "checkpoints").exists()


def test_command_line_errors_exit_2(assets, capsys):
    path = config_file(assets, assets["root"] / "cli")
    assert cli(["--config", str(path), "strategy=zero9"]) == 2
    err = capsys.readouterr().err
    assert "zero9" in err and "deepspeed_stage_3" in err
    assert cli(["--config", str(path), "lern_rate=1"]) == 2
    assert "lern_rate" in capsys.readouterr().err
    assert cli(["--config", str(assets["root"] / "nope.yaml")]) == 2


def test_slimlm_subcommand_wiring(assets):
    parser = argparse.ArgumentParser(prog="slimlm")
    add_distill(parser.add_subparsers(dest="verb"))
    out = assets["root"] / "sub"
    args = parser.parse_args(["distill", "--config", str(config_file(assets, out)), "max_steps=2"])
    assert run_distill(args) == 0
    assert read(out / "model").eval["distill"]["steps"] == 2


def test_overrides_may_come_before_and_after_flags(assets, capsys):
    path = config_file(assets, assets["root"] / "mixed")
    assert cli(["a_typo=1", "--config", str(path), "--resume", "max_steps=2"]) == 2  # parsed, then refused
    assert "unknown setting(s) a_typo" in capsys.readouterr().err


class RaisingTeacher(torch.nn.Module):
    """A teacher whose forward pass must not run."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher's forward pass ran")


def test_plain_cross_entropy_skips_the_teacher_forward():
    # teacher_mode=logits at kd_weight 0 (the CE baseline): nothing reads the teacher, so it must not run.
    from slimlm.recipes.distill import LossConfig, make_module

    torch.manual_seed(0)
    student, _ = tiny_model("llama", seed=2)
    ids = torch.randint(0, student.config.vocab_size, (4, 32))
    batch = {"input_ids": ids, "labels": ids.clone(), "row": torch.arange(4)}
    module = make_module(student.train(), RaisingTeacher(), None, None,
                         loss=LossConfig(kd_weight=0.0, ce_weight=1.0), optim={})
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        total, parts = module(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(parts["ce"])
        assert "kd" not in parts
    assert losses[-1] < losses[0]
    kd = make_module(student, RaisingTeacher(), None, None, loss=LossConfig(kd_weight=1.0), optim={})
    with pytest.raises(AssertionError, match="forward pass ran"):
        kd(batch)  # with a KD term the teacher is still needed


@pytest.mark.parametrize("override, match", [
    ("min_lr_ratio=1.5", "min_lr_ratio must be in \\[0, 1\\]"),
    ("min_lr_ratio=-0.1", "min_lr_ratio must be in \\[0, 1\\]"),
    ("sequence.prompts=0", "sequence.prompts must be >= 1"),
    ("threads=0", "threads must be at least 1"),
    ("sequence.max_new_tokens=0", "sequence.max_new_tokens must be >= 1"),
    ("sequence.temperature=-0.5", "sequence.temperature must be >= 0"),
    # each was found at the first step (after both models loaded), unnamed or as an internal error
    ("loss.temperature=0", "loss.temperature must be > 0"),
    ("loss.skew=2", r"loss.skew must be in \[0, 1\]"),
    ("loss.kd_weight=-1", "loss.kd_weight must be >= 0"),
    ("loss.chunk_size=0", "loss.chunk_size must be >= 1"),
    ("loss.hidden_layers=-2", "loss.hidden_layers must be >= 0"),
    ("lora.rank=0", "lora.rank must be >= 1"),
    ("topk.k=0", "topk.k must be >= 1"),
    ("sequence.prompt_len=64", r"sequence.prompt_len must be >= 1, and below seq_len \(64\) in teacher_mode=sequence"),
    ("seq_len=100000", "seq_len=100000 is longer than .*context"),  # was a runaway first step
    ("data=builtin:wkii", "data: unknown built-in corpus 'wkii'"),  # found when the data was read, after both loads
    ("seed=-1", "seed must be an integer"),
])
def test_settings_that_would_break_training_are_refused_by_key(assets, override, match, monkeypatch):
    import slimlm.recipes.distill as recipe

    out = assets["root"] / "bad"
    monkeypatch.setattr(recipe, "load_student", lambda *a, **k: pytest.fail("loaded a model before checking"))
    with pytest.raises(SlimlmError, match=match):
        main(load_config(DistillConfig, config_file(assets, out, teacher_mode="sequence"), [override]))
    assert not out.exists()


def test_zero_checkpoint_every_and_auto_devices_stay_allowed(assets):
    config = load_config(DistillConfig, config_file(assets, assets["root"] / "ok"), ["checkpoint_every=0"])
    assert config.checkpoint_every == 0 and config.devices == "auto"


def test_out_dir_that_is_a_file_is_refused_before_loading(assets, monkeypatch):
    import slimlm.recipes.distill as recipe

    out = assets["root"] / "a_file"
    out.write_text("not a folder")
    monkeypatch.setattr(recipe, "load_student", lambda *a, **k: pytest.fail("loaded a model before checking"))
    with pytest.raises(SlimlmError, match="out_dir .*a_file is a file"):
        main(load_config(DistillConfig, config_file(assets, out), []))
    with pytest.raises(SlimlmError, match="a_file is a file, so the run's folder cannot be made under it"):
        main(load_config(DistillConfig, config_file(assets, out), [f"out_dir={out / 'sub'}"]))


def test_a_run_refused_after_its_out_dir_was_made_leaves_no_folder(assets, capsys):
    # An empty data file is found only once the student and teacher are loaded, after out_dir was made: the
    # failed run removes the empty folder it made (one it did not make stays).
    empty = assets["root"] / "empty.txt"
    empty.write_text("")
    out = assets["root"] / "refused_run"
    assert cli(["--config", str(config_file(assets, out, data=str(empty)))]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert cli(["--config", str(config_file(assets, out, data=str(empty)))]) == 2
    assert out.is_dir()


def _sigterm(trainer):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raise SIGTERMException()  # Lightning's SIGTERM: a SystemExit with no code, status 0 unless caught


def _ctrl_c(trainer):
    from lightning.pytorch.trainer.states import TrainerStatus

    trainer.state.status = TrainerStatus.INTERRUPTED  # Lightning catches Ctrl-C inside fit, marks the trainer
    raise SystemExit(1)  # and exits 1, its message silenced by quiet_libraries


@pytest.mark.parametrize("stop, code, words", [(_sigterm, 143, "stopped by SIGTERM at step 0"),
                                               (_ctrl_c, 130, "interrupted at step 0")])
def test_a_stopped_run_exits_non_zero_with_a_resume_hint_and_no_export(assets, monkeypatch, capsys, stop, code, words):
    import lightning.pytorch as pl

    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *args, **kwargs: stop(self))
    out = assets["root"] / f"stopped-{code}"
    with pytest.raises(SystemExit) as exc:
        cli(["--config", str(config_file(assets, out)), "max_steps=2"])
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    # no checkpoint yet: it says so, not "--resume from the last checkpoint" (a resume would start at step 0)
    assert len(err) == 1 and words in err[0] and "No checkpoint was written yet" in err[0], err
    assert "--resume" not in err[0] and not (out / "model").exists()


def test_a_resume_past_max_steps_is_refused_before_loading(assets, kd_run, monkeypatch):
    import slimlm.recipes.distill as recipe

    path, _, _ = kd_run  # finished at step 20
    monkeypatch.setattr(recipe, "load_student", lambda *a, **k: pytest.fail("loaded a model before checking"))
    with pytest.raises(SlimlmError, match="at step 20, past max_steps=4"):
        main(load_config(DistillConfig, path, ["max_steps=4"]), resume=True)


def test_student_padded_past_the_tokenizer_distils_on_the_shared_ids(assets):
    # Same tokenizer (259 ids), student embedding matrix padded to 320 rows, teacher's 259.
    root = assets["root"]
    student, tok = tiny_model("llama", seed=2, vocab_size=320)
    student.save_pretrained(root / "student_padded")
    tok.save_pretrained(root / "student_padded")
    out = root / "padded"
    export = main(load_config(DistillConfig, config_file(assets, out, student=str(root / "student_padded")),
                              ["max_steps=2", "checkpoint_every=0"]))
    r = read(export).eval["distill"]
    assert r["steps"] == 2 and r["final"]["kd"] >= 0
    # top-k: the teacher's cached ids index the student's logits, so a teacher padded past the student is refused
    with pytest.raises(SlimlmError, match="teacher_mode=topk needs a student with at least the teacher's 320"):
        main(load_config(DistillConfig, config_file(assets, root / "padded_topk", teacher=str(root / "student_padded")),
                         ["teacher_mode=topk", "max_steps=2"]))


def test_progress_in_a_log_is_plain_lines(assets, capsys):
    """stderr not a terminal (here: captured; in use: a log file): a line per tenth of the steps, no bar of
    carriage returns."""
    out = assets["root"] / "lines"
    main(load_config(DistillConfig, config_file(assets, out), ["max_steps=4", "checkpoint_every=0", "progress=true"]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("training: step ")]
    assert [line.split(",")[0] for line in lines] == [f"training: step {s}/4" for s in (1, 2, 3, 4)]
    assert "loss" in lines[-1] and "Epoch 0" not in err  # no Lightning bar (its "Epoch 0: ..." line)


def recipe_process(config_path):
    """`python recipes/distill.py --config PATH`, as users launch it (DeepSpeed's engine on CPU runs there);
    returns the process and the file its stderr goes to (a pipe nobody reads could fill and block it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "distill.py"
    err = Path(str(config_path) + ".stderr")
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(recipe), "--config", str(config_path)], stdout=subprocess.DEVNULL,
                                stderr=f, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return proc, err


def csv_rows(out) -> list[dict]:
    import csv

    return list(csv.DictReader((out / "logs" / "distill" / "csv" / "metrics.csv").open()))


def test_both_training_paths_log_the_same_rows(assets):
    """metrics.csv has a row at each multiple of log_every and at the last step, numbered from 1 like the
    checkpoints, each the mean over the step's micro-batches with the rate the step used: on Lightning's path
    and on DeepSpeed's engine (a `python recipes/distill.py` process, as users launch it) alike. Lightning's
    own logging numbered from 0, logged the last micro-batch's loss and dropped the last step here."""
    settings = dict(max_steps=5, log_every=2, grad_accum=2, batch_size=2, checkpoint_every=0)
    out = assets["root"] / "rows_lightning"
    main(load_config(DistillConfig, config_file(assets, out, **settings), []))
    ds_out = assets["root"] / "rows_deepspeed"
    proc, err = recipe_process(config_file(assets, ds_out, strategy="deepspeed_stage_2", **settings))
    assert proc.wait(timeout=300) == 0, err.read_text()[-3000:]
    rows, ds_rows = csv_rows(out), csv_rows(ds_out)
    assert [r["step"] for r in rows] == [r["step"] for r in ds_rows] == ["2", "4", "5"]
    history = torch.load(out / "checkpoints" / "last" / "state.ckpt", weights_only=True)["slimlm_history"]
    for row, ds_row in zip(rows, ds_rows):
        step = int(row["step"])
        parts = [h["loss"] for h in history if h["step"] == step]
        assert len(parts) == 2 and float(row["train/loss"]) == pytest.approx(sum(parts) / 2, rel=1e-6)
        assert float(ds_row["train/loss"]) == pytest.approx(float(row["train/loss"]), rel=1e-3)
        assert float(ds_row["lr-AdamW"]) == pytest.approx(float(row["lr-AdamW"]), rel=1e-6)
    assert float(rows[0]["lr-AdamW"]) != float(rows[1]["lr-AdamW"])  # the warmup's rate, as the step used it


def test_sigterm_on_deepspeeds_engine_exits_143_with_a_resume_hint(assets):
    """As on Lightning's path (above): a preempted DeepSpeed run says where it stopped and how to go on."""
    import signal
    import time

    out = assets["root"] / "ds_sigterm"
    proc, err_file = recipe_process(config_file(assets, out, strategy="deepspeed_stage_2", max_steps=400,
                                                checkpoint_every=1))
    meta = out / "checkpoints" / "last" / "meta.json"
    deadline = time.monotonic() + 240
    while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meta.exists(), err_file.read_text()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = err_file.read_text()
    line = next(line for line in err.splitlines() if "stopped by SIGTERM" in line)
    assert line.startswith("distill: stopped by SIGTERM at step ") and "--resume" in line and str(out) in line
    assert f"from the checkpoint at step {json.loads(meta.read_text())['global_step']} in " in line
    assert not (out / "model").exists()


def test_sequence_mode_says_when_the_data_has_fewer_blocks_than_prompts(tmp_path, capsys):
    from safetensors.torch import load_file

    from slimlm.recipes.distill import SequenceConfig, write_sequences

    teacher, tok = tiny_model("llama", seed=1)
    blocks = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "rows.safetensors"
    write_sequences(teacher, tok, blocks, SequenceConfig(prompts=5, prompt_len=8, max_new_tokens=4), 0, path)
    assert load_file(path)["input_ids"].shape == (3, 12)  # every block the data has, no more
    assert "sequence.prompts is 5 but the data gives 3 blocks" in capsys.readouterr().err
    write_sequences(teacher, tok, blocks, SequenceConfig(prompts=2, prompt_len=8, max_new_tokens=4), 0, path)
    assert load_file(path)["input_ids"].shape == (2, 12) and "note" not in capsys.readouterr().err
