"""recipes/qat.py in one process on a tiny model: distillation through fake-quant weights lowers the
KD loss and held-out perplexity, the export is the packed GPTQ checkpoint `slimlm quantize` writes and
holds the trained codes, checkpoints are weights_only and resume, and bad configs are clear errors."""
from __future__ import annotations

import argparse
import json
import random

import pytest
import torch
import yaml

from slimlm.recipes.config import load_config
from slimlm.recipes.qat import QATConfig, add_qat, cli, main
from slimlm.toolkit.distill import kd_loss
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.export import read
from slimlm.toolkit.models import load, tiny_model
from slimlm.toolkit.quant.calibrate import quantize_model
from slimlm.toolkit.quant.gptq_format import gptq_config, read_gptq_tensors
from slimlm.toolkit.quant.scheme import QuantScheme

SCHEME = QuantScheme(bits=4, group_size=32, sym=False)
WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat and ran far away home".split()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_text(path, docs, seed):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(docs)))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    model, tok = tiny_model("llama", seed=4, initializer_range=0.3)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {"root": root, "model": str(root / "base"), "data": make_text(root / "train.txt", 40, 0),
            "held_out": make_text(root / "held_out.txt", 8, 1)}


def config_file(assets, out_dir, **settings):
    base = dict(model=assets["model"], quant=dict(bits=4, group_size=32, sym=False), data=assets["data"],
                eval_data=assets["held_out"], seq_len=32, batch_size=4, lr=5e-4, warmup_steps=2, max_steps=10,
                checkpoint_every=5, log_every=1, eval_windows=4, eval_window=32, progress=False, out_dir=str(out_dir))
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path


@pytest.fixture(scope="module")
def run(assets):
    out = assets["root"] / "run"
    path = config_file(assets, out)
    torch.set_num_threads(1)
    return path, out, main(load_config(QATConfig, path, []))


def held_out_kd(model, base, assets) -> float:
    from slimlm.toolkit.data import load_texts, pack

    _, tok = load(assets["model"])
    blocks = pack(load_texts(assets["held_out"]), tok, 32)[:16]
    with torch.no_grad():
        return float(kd_loss(model(input_ids=blocks).logits, base(input_ids=blocks).logits))


def test_kd_through_fake_quant_closes_part_of_the_rtn_gap(assets, run):
    # A random model's perplexity on text says little; its KL to the unquantised model on held-out text
    # is what QAT with distillation minimises, and what RTN int4 raises.
    _, _, export = run
    r = read(export).eval["qat"]
    assert r["steps"] == 10 and r["final"]["kd"] < 0.9 * r["first"]["kd"], (r["first"], r["final"])
    base, trained, rtn = load(assets["model"])[0], load(str(export))[0], load(assets["model"])[0]
    quantize_model(rtn, SCHEME, "rtn", progress=False)
    kd_rtn, kd_qat = held_out_kd(rtn, base, assets), held_out_kd(trained, base, assets)
    assert kd_qat < 0.7 * kd_rtn, (kd_qat, kd_rtn)
    # the figures the manifest carries for real models (scripts/qat_gap.py reads them)
    assert all(r[k] > 1 for k in ("perplexity_base", "perplexity_start", "perplexity_after"))
    start, base = r["perplexity_start"], r["perplexity_base"]
    if start > base:  # a random tiny model's RTN start may score below the base: then there is no gap to close
        assert r["gap_closed"] == pytest.approx((start - r["perplexity_after"]) / (start - base), abs=1e-3)
    else:
        assert r["gap_closed"] is None
    assert r["perplexity_text"] == "held-out"  # eval_data is its own file


def test_export_is_a_packed_gptq_checkpoint_with_the_trained_codes(assets, run):
    _, _, export = run
    manifest = read(export)  # verifies the sha256 of every tensor file
    assert manifest.transforms["quant"]["method"] == "qat" and manifest.transforms["quant"]["format"] == "gptq"
    qc = gptq_config(export)
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["quant_method"]) == (4, 32, False, "gptq")
    assert len(read_gptq_tensors(export)) == 14
    hf, _ = load(str(export))
    rtn, _ = load(assets["model"])
    quantize_model(rtn, SCHEME, "rtn", progress=False)
    w, w0 = hf.model.layers[0].mlp.up_proj.weight, rtn.model.layers[0].mlp.up_proj.weight
    assert (w != w0).float().mean() > 0.01  # trained codes, not RTN's
    ids = torch.tensor([[1, 2, 3, 4]])
    assert hf(input_ids=ids).logits.shape == (1, 4, 259)


def test_checkpoint_is_weights_only_and_resume_continues(assets, run):
    path, out, _ = run
    state = torch.load(out / "checkpoints" / "last" / "state.ckpt", weights_only=True)
    assert any(k.endswith("qat_scales") for k in state["state_dict"]) is False  # rtn start: dynamic grid
    assert any(k.endswith("down_proj.weight") for k in state["state_dict"])
    assert (out / "logs" / "qat" / "csv" / "metrics.csv").is_file()
    with pytest.raises(SlimlmError, match="already holds a checkpoint"):
        main(load_config(QATConfig, path, []))
    with pytest.raises(SlimlmError, match="quant"):
        main(load_config(QATConfig, path, ["quant.group_size=64"]), resume=True)
    export = main(load_config(QATConfig, path, ["max_steps=13"]), resume=True)
    r = read(export).eval["qat"]
    assert r["resumed_from"] == 10 and r["steps"] == 13 and r["first"]["step"] == 1
    assert r["perplexity_start"] > 1 and r["perplexity_after"] > 1 and "gap_closed" in r  # figures carried over
    assert json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["global_step"] == 13


def test_gptq_start_on_a_frozen_grid_with_cross_entropy_resumes(assets):
    out = assets["root"] / "gptq"
    path = config_file(assets, out, init="gptq", quant=dict(bits=4, group_size=32, sym=True, act_order=True),
                       calibration=dict(samples=4, seq_len=32), loss=dict(kd_weight=0.0, ce_weight=1.0),
                       max_steps=4, checkpoint_every=2, eval_windows=0)
    main(load_config(QATConfig, path, []))
    state = torch.load(out / "checkpoints" / "last" / "state.ckpt", weights_only=True)["state_dict"]
    g_idx = [v for k, v in state.items() if k.endswith("qat_g_idx")]
    assert len(g_idx) == 14 and any(not torch.equal(g, torch.arange(len(g)) // 32) for g in g_idx)  # GPTQ's act-order
    export = main(load_config(QATConfig, path, ["max_steps=6"]), resume=True)  # resume lays the grid from the checkpoint
    after = read_gptq_tensors(export)
    name = next(k for k, v in state.items() if k.endswith("qat_g_idx"))[len("model."):-len(".qat_g_idx")]
    assert torch.equal(after[name]["g_idx"].long(), state[f"model.{name}.qat_g_idx"])
    assert gptq_config(export)["desc_act"] is True


def test_lengths_the_run_does_not_use_are_not_held_against_the_context(assets, monkeypatch):
    """No evaluation (eval_windows=0) and an RTN start: eval_window and calibration.seq_len are never read, so a
    value past the model's 1,024 positions is no reason to refuse; seq_len is."""
    import slimlm.recipes.qat as recipe

    path = config_file(assets, assets["root"] / "unused")
    monkeypatch.setattr(recipe, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("past the checks")))
    with pytest.raises(RuntimeError, match="past the checks"):
        main(load_config(QATConfig, path, ["eval_windows=0", "eval_window=4096", "calibration.seq_len=4096"]))
    with pytest.raises(SlimlmError, match="eval_window=4096 is longer"):
        main(load_config(QATConfig, path, ["eval_windows=2", "eval_window=4096"]))


@pytest.mark.parametrize("override, match", [
    ("quant.bits=3", "bits must be 4 or 8"),
    ("quant.group_size=48", "group size"),
    ("init=awq", "unknown QAT init"),
    ("grid=dynamic init=gptq", "re-round GPTQ"),
    ("quant.act_order=true", "act_order is a GPTQ option"),
    ("loss.kd_weight=0", "at least one positive"),
    ("loss.kind=kl", "unknown loss.kind"),
    ("train=norms", "unknown train"),
    ("strategy=zero", "unknown strategy"),
    ("lora=true", "unknown setting"),
    ("min_lr_ratio=2", "min_lr_ratio must be in"),
    ("eval_windows=-1", "eval_windows must be >= 0"),
    ("eval_window=1", "eval_window >= 2"),
    ("loss.temperature=0", "loss.temperature must be > 0"),  # was found at the first step
    ("loss.chunk_size=0", "loss.chunk_size must be >= 1"),
    ("seq_len=100000", "seq_len=100000 is longer than .*context"),  # was a runaway first step
    ("calibration.seq_len=100000 init=gptq", "calibration.seq_len=100000 is longer"),
    ("data=/no/such/file.txt", "data: text source '/no/such/file.txt' does not exist"),
    ("seed=-1", "seed must be an integer"),
])
def test_bad_config_is_a_clear_error_before_work(assets, override, match, monkeypatch):
    import slimlm.recipes.qat as recipe

    out = assets["root"] / "bad"
    path = config_file(assets, out)
    monkeypatch.setattr(recipe, "build", lambda *a, **k: pytest.fail("loaded the model before checking"))
    with pytest.raises(SlimlmError, match=match):
        main(load_config(QATConfig, path, override.split()))
    assert not out.exists()


def test_command_line(assets, capsys):
    path = config_file(assets, assets["root"] / "cli")
    assert cli(["--config", str(path), "quant.group_size=7"]) == 2
    assert "group size" in capsys.readouterr().err
    from slimlm.recipes.cli import main as slimlm

    assert slimlm(["qat", "--config", str(path), "init=awq"]) == 2
    assert "unknown QAT init" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_qat(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["qat", "--config", str(path), "max_steps=3", "--resume"])
    assert args.overrides == ["max_steps=3"] and args.resume


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ddp_ranks_under_torchrun(assets):
    """DDP on CPU (gloo): every rank trains its FakeQuantLinears, rank 0 alone converts and exports."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = assets["root"] / "ddp"
    path = config_file(assets, out, strategy="ddp", max_steps=4, checkpoint_every=0, eval_windows=0)
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "qat.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", recipe,
                           "--config", str(path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr
    assert read(out / "model").eval["qat"]["steps"] == 4
    assert len(read_gptq_tensors(out / "model")) == 14


def test_out_dir_that_is_a_file_is_refused_before_loading(assets, monkeypatch):
    import slimlm.recipes.qat as recipe

    out = assets["root"] / "a_file"
    out.write_text("not a folder")
    monkeypatch.setattr(recipe, "build", lambda *a, **k: pytest.fail("loaded the model before checking"))
    with pytest.raises(SlimlmError, match="is a file"):
        main(load_config(QATConfig, config_file(assets, out), []))


@pytest.mark.parametrize("base, start, after, expected", [
    (10.0, 12.0, 11.0, 0.5),   # half the gap closed
    (10.0, 9.0, 9.5, None),    # the start already below the base: no gap, no share (was 1.5 "closed")
    (10.0, 10.0, 10.5, None),  # no gap at all
])
def test_gap_closed_only_where_there_is_a_gap(base, start, after, expected):
    from slimlm.recipes.qat import gap_closed

    assert gap_closed(base, start, after) == expected


def test_a_local_data_file_without_eval_data_is_not_called_held_out(assets):
    from slimlm.recipes.training import eval_text

    own = load_config(QATConfig, None, [f"data={assets['data']}"])
    assert eval_text(own) == (assets["data"], "train", False)  # a local file has no validation split
    other = load_config(QATConfig, None, [f"data={assets['data']}", f"eval_data={assets['held_out']}"])
    assert eval_text(other)[2] is True
    assert eval_text(load_config(QATConfig, None, [])) == ("builtin:wiki", "validation", True)
