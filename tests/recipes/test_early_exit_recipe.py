"""recipes/early_exit.py in one process on a tiny model: exits learn (loss down), the export verifies and
loads in plain transformers, resume continues from the checkpoint step, bad configs fail before work."""
from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from slimlm.recipes.config import load_config
from slimlm.recipes.early_exit import EarlyExitConfig, add_early_exit, cli, main
from slimlm.toolkit.early_exit import EXIT_FILE, load_exits, read_exit_spec
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import read
from slimlm.toolkit.models import load, tiny_model

WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat and ran far away home".split()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("early_exit")
    model, tok = tiny_model("llama", seed=4, num_hidden_layers=4)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)))
    return {"root": root, "model": str(root / "base"), "data": str(root / "train.txt")}


def config_file(assets, out_dir, **settings):
    base = dict(model=assets["model"], exit_layers=[1, 2], norm="own", curriculum="all", data=assets["data"],
                seq_len=32, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=12, checkpoint_every=6, log_every=1,
                layer_dropout=0.2, kd_weight=0.5, progress=False, out_dir=str(out_dir))
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path


@pytest.fixture(scope="module")
def run(assets):
    out = assets["root"] / "run"
    path = config_file(assets, out)
    torch.set_num_threads(1)
    return path, out, main(load_config(EarlyExitConfig, path, []))


def test_loss_goes_down_and_the_exits_learn(run):
    _, _, export = run
    result = read(export).eval["early_exit"]
    assert result["steps"] == 12 and result["resumed_from"] == 0
    first, final = result["first"], result["final"]
    assert final["loss"] < 0.7 * first["loss"], (first, final)
    assert final["ce_1"] < 0.7 * first["ce_1"] and "kd_2" in final


def test_export_verifies_loads_in_plain_transformers_and_keeps_the_exits(assets, run):
    _, _, export = run
    manifest = read(export)  # every tensor file, early_exit.safetensors included, hashed and checked
    assert EXIT_FILE in manifest.files
    assert manifest.transforms["exit_layers"] == {"layers": [1, 2], "norm": "own", "file": EXIT_FILE}
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    ours, _ = load(str(export))
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=x).logits, ours(input_ids=x).logits)
    exits = load_exits(export, ours)
    assert exits.layers == [1, 2] and exits.norm_kind == "own"
    base, _ = load(assets["model"])
    trained = exits.exits["1"].norm.weight
    assert not torch.equal(trained, base.model.norm.weight)  # own norms moved away from their start
    assert "forward" not in ours.model.layers[0].__dict__


def test_checkpoint_is_weights_only_and_logs_exist(run):
    _, out, _ = run
    state = torch.load(out / "checkpoints" / "last" / "state.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 12 and len(state["slimlm_history"]) == 12
    assert "exits.exits.1.norm.weight" in state["state_dict"]
    header = (out / "logs" / "early_exit" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "train/ce_2" in header and "train/kd_1" in header


def test_resume_continues_from_the_checkpoint_step(assets, run):
    path, out, _ = run
    with pytest.raises(SlimlmError, match="--resume"):
        main(load_config(EarlyExitConfig, path, []))
    with pytest.raises(SlimlmError, match="exit_layers"):
        main(load_config(EarlyExitConfig, path, ["exit_layers=[1]"]), resume=True)
    # more steps on top of the finished run: it starts at 12, trains 4 more
    export = main(load_config(EarlyExitConfig, path, ["max_steps=16"]), resume=True)
    result = read(export).eval["early_exit"]
    assert result["resumed_from"] == 12 and result["steps"] == 16
    assert result["first"]["step"] == 1 and result["final"]["step"] == 16  # history carried over
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["global_step"] == 16


def test_rotational_shared_with_eval_records_per_exit_figures(assets):
    out = assets["root"] / "rot"
    path = config_file(assets, out, norm="shared", curriculum="rotational", max_steps=4, checkpoint_every=0,
                       layer_dropout=0.0, kd_weight=0.0, eval_windows=2, eval_window=32, eval_before=True)
    export = main(load_config(EarlyExitConfig, path, []))
    assert not (export / EXIT_FILE).exists() and read_exit_spec(export).norm == "shared"
    result = read(export).eval["early_exit"]
    import csv

    rows = [r for r in csv.DictReader(open(out / "logs" / "early_exit" / "csv" / "metrics.csv")) if r.get("train/loss")]
    idle = [r["train/ce_1"] == "nan" for r in rows]  # one exit per step: exit 1 idles every other step
    assert idle == [False, True, False, True], idle
    for when in ("before", "after"):
        figures = result[when]["exits"]
        assert set(figures) == {"1", "2"} and 0.0 <= figures["1"]["agreement"] <= 1.0
    assert result["after"]["exits"]["1"]["perplexity"] < result["before"]["exits"]["1"]["perplexity"]
    assert result["after"]["text"] == "training"  # a local file and no eval_data: said, not called held out


def test_lens_exits_are_fitted_then_trained_and_leave_the_model_as_it_was(assets):
    out = assets["root"] / "lens"
    path = config_file(assets, out, norm="lens", train="exits", lens_fit_blocks=16, max_steps=4, checkpoint_every=0,
                       layer_dropout=0.0, kd_weight=1.0, lr=1e-3, eval_windows=2, eval_window=32, eval_before=True)
    export = main(load_config(EarlyExitConfig, path, []))
    spec = read_exit_spec(export)
    assert spec.norm == "lens" and (export / EXIT_FILE).exists()
    result = read(export).eval["early_exit"]
    assert result["lens_fit_seconds"] > 0
    for e in ("1", "2"):  # the least-squares fit alone brings each exit closer to the final layer
        assert result["after_fit"]["exits"][e]["perplexity"] < result["before"]["exits"][e]["perplexity"]
    # train=exits with no unfrozen layers: the exported model computes exactly what the base did
    base, ours = AutoModelForCausalLM.from_pretrained(assets["model"]).eval(), load(str(export))[0]
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, ours(input_ids=x).logits)
    exits = load_exits(export, ours)
    assert exits.norm_kind == "lens" and exits.exits["1"].proj.weight.abs().sum() > 0
    # resumed, the run's manifest keeps the figures taken before training (it wrote only "after")
    resumed = read(main(load_config(EarlyExitConfig, path, ["max_steps=6"]), resume=True)).eval["early_exit"]
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 6
    assert {k: resumed[k] for k in ("before", "after_fit", "lens_fit_seconds")} == \
        {k: result[k] for k in ("before", "after_fit", "lens_fit_seconds")}


@pytest.mark.parametrize("override, match", [
    ("exit_layers=[2,9]", "out of range"),
    ("exit_layers=[2,4]", "exit layer 4 is the model's last layer"),
    ("threads=0", "threads must be at least 1"),  # served, it failed: no draft from there
    ("strategy=deepspeed_stage_3", "does not train under deepspeed_stage_3"),  # it failed at its first step
    ("curriculum=shuffle", "unknown curriculum"),
    ("norm=mine", "unknown norm"),
    ("exit_weights=[1.0]", "exit_weights"),
    ("train=exits", "nothing to train"),
    ("lens_ridge=-1", "lens_ridge must be >= 0"),
    ("eval_windows=-1", "eval_windows must be >= 0"),
    ("eval_window=1", "eval_window >= 2"),
    ("min_lr_ratio=-1", "min_lr_ratio must be in"),
    ("eval_data=/no/such/file.txt eval_windows=2", "does not exist|no such|not found"),
    # found at the first step (unnamed), or a ZeroDivisionError there
    ("exit_weights=[1,-1]", "exit_weights must be weights >= 0"),
    ("final_weight=-1", "final_weight must be >= 0"),
    ("kd_weight=-1", "kd_weight must be >= 0"),
    ("kd_temperature=0", "kd_temperature must be > 0"),
    ("chunk_size=0", "chunk_size must be >= 1"),
    ("unfreeze_layers=-1", "unfreeze_layers must be >= 0"),
    ("seq_len=100000", "seq_len=100000 is longer than .*context"),  # was a runaway first step
    ("data=builtin:wkii eval_windows=0", "data: unknown built-in corpus"),  # was read only after the model loaded
    ("seed=-1", "seed must be an integer"),
])
def test_bad_config_is_a_clear_error_before_work(assets, override, match, monkeypatch):
    out = assets["root"] / "bad"
    path = config_file(assets, out, norm="shared")
    import slimlm.recipes.early_exit as recipe

    monkeypatch.setattr(recipe, "build", lambda *a, **k: pytest.fail("loaded the model before checking"))
    with pytest.raises(SlimlmError, match=match):
        main(load_config(EarlyExitConfig, path, override.split()))
    assert not out.exists()


def test_command_line(assets, capsys):
    out = assets["root"] / "cli"
    path = config_file(assets, out)
    assert cli(["--config", str(path), "exit_layers=[7]"]) == 2
    assert "out of range" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_early_exit(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["early-exit", "--config", str(path), "max_steps=3", "--resume"])
    assert args.overrides == ["max_steps=3"] and args.resume


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ddp_ranks_with_idle_exits_and_skipped_layers(assets):
    """DDP (find_unused_parameters=False) needs a gradient for every weight on every rank: rotating own
    norms and skipped layers must still be in the graph."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = assets["root"] / "ddp"
    path = config_file(assets, out, strategy="ddp", curriculum="rotational", layer_dropout=0.6,
                       layer_dropout_schedule="constant", max_steps=6, checkpoint_every=0)
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "early_exit.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", recipe,
                           "--config", str(path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr
    assert read(out / "model").eval["early_exit"]["steps"] == 6


def test_eval_data_is_the_held_out_text_when_given(assets):
    from slimlm.recipes.training import eval_text

    other = assets["root"] / "held_out.txt"
    other.write_text("the quick brown fox")
    config = load_config(EarlyExitConfig, None, [f"data={assets['data']}", f"eval_data={other}"])
    assert eval_text(config) == (str(other), "train", True)
    assert eval_text(load_config(EarlyExitConfig, None, [f"data={assets['data']}"]))[2] is False
    assert eval_text(load_config(EarlyExitConfig, None, [])) == ("builtin:wiki", "validation", True)
    # a hub spec that names its split always reads it: training on it and evaluating "its validation" is not held out
    hub = "hf:wikitext:wikitext-2-raw-v1:train"
    assert eval_text(load_config(EarlyExitConfig, None, [f"data={hub}"])) == (hub, "train", False)
    assert eval_text(load_config(EarlyExitConfig, None, ["data=hf:wikitext:wikitext-2-raw-v1"]))[1:] == ("validation", True)
