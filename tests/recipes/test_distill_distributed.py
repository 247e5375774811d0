"""recipes/distill.py as users launch it, in subprocesses on tiny models: two DDP ranks (gloo) under
torchrun, two DeepSpeed ZeRO-2 ranks under the `deepspeed` launcher (DeepSpeed's own engine: Lightning
refuses ZeRO on CPU), and a run killed with SIGKILL midway that resumes to the uninterrupted result.

Every process gets OMP_NUM_THREADS=1: two ranks on two shared cores with spinning OpenMP threads run
tiny models tens of times slower."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slimlm.toolkit.export import write
from slimlm.toolkit.models import tiny_model

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "distill.py")
BIN = Path(sys.executable).parent
WORDS = "the a quick brown fox jumps over lazy dog cat sat on mat and ran far away home".split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_mp")
    teacher, tok = tiny_model("qwen2", seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    student, tok = tiny_model("llama", seed=2)
    write(student, tok, root / "student")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(60)))
    return root


def config(root: Path, name: str, **settings) -> tuple[Path, Path]:
    out = root / name
    base = dict(teacher=str(root / "teacher"), student=str(root / "student"), data=str(root / "train.txt"),
                seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=12, checkpoint_every=6,
                log_every=1, progress=False, out_dir=str(out))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path, out


def run(cmd: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def result(out: Path) -> dict:
    return json.loads((out / "model" / "slimlm.json").read_text())["eval"]["distill"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next((out / "model").glob("*.safetensors")))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ddp_ranks_under_torchrun(assets):
    path, out = config(assets, "ddp", strategy="ddp")
    log = run([str(BIN / "torchrun"), "--nproc_per_node", "2", RECIPE, "--config", str(path)])
    assert "GLOBAL_RANK: 1" in log  # two ranks really ran
    res = result(out)
    assert res["steps"] == 12 and res["final"]["loss"] < 0.8 * res["first"]["loss"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_zero2_ranks_under_the_deepspeed_launcher(assets):
    path, out = config(assets, "zero2", strategy="deepspeed_stage_2")
    run([str(BIN / "deepspeed"), "--num_gpus", "2", RECIPE, "--config", str(path)])
    res = result(out)
    assert res["steps"] == 12 and res["final"]["loss"] < 0.8 * res["first"]["loss"]
    state = out / "checkpoints" / "last" / "state.ckpt"
    assert sorted(p.name for p in state.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # sharded
    ddp = assets / "ddp"
    if (ddp / "model").exists():  # same data order and schedule: ZeRO-2 matches DDP
        assert res["final"]["loss"] == pytest.approx(result(ddp)["final"]["loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_zero3_ranks_export_the_gathered_model(assets):
    """ZeRO-3 partitions every parameter; the export gathers them. It crashed after training
    (ModuleNotFoundError: deepspeed.zero, an attribute of the package and no module)."""
    path, out = config(assets, "zero3", strategy="deepspeed_stage_3")
    run([str(BIN / "deepspeed"), "--num_gpus", "2", RECIPE, "--config", str(path)])
    res = result(out)
    assert res["steps"] == 12 and res["final"]["loss"] < 0.8 * res["first"]["loss"]
    from slimlm.toolkit.models import load

    model, _ = load(str(out / "model"))
    assert all(p.numel() > 0 for p in model.parameters())  # whole tensors, not ZeRO-3's empty placeholders
    ddp = assets / "ddp"
    if (ddp / "model").exists():  # same data order and schedule: ZeRO-3 matches DDP
        assert res["final"]["loss"] == pytest.approx(result(ddp)["final"]["loss"], rel=1e-3)


def kill_when_checkpointed(cmd: list[str], ckpt_meta: Path, step: int, timeout: float = 240) -> int:
    """Start `cmd`, SIGKILL it as soon as a checkpoint of `step` or later exists; return that step."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ckpt_meta.exists():
                seen = json.loads(ckpt_meta.read_text())["global_step"]
                if seen >= step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return seen
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
        pytest.fail("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_midway_then_resume_matches_an_uninterrupted_run(assets):
    # Enough work per step (and 40 steps) that the kill lands mid-run, not after the end.
    settings = dict(seq_len=128, batch_size=8, max_steps=40, checkpoint_every=5)
    path, out = config(assets, "killed", **settings)
    ref_path, ref_out = config(assets, "uninterrupted", **settings)
    cmd = [sys.executable, RECIPE, "--config", str(path)]
    killed_at = kill_when_checkpointed(cmd, out / "checkpoints" / "last" / "meta.json", step=10)
    assert 10 <= killed_at < 40
    assert not (out / "model").exists()
    run(cmd + ["--resume"])
    run([sys.executable, RECIPE, "--config", str(ref_path)])
    resumed, reference = result(out), result(ref_out)
    assert resumed["steps"] == reference["steps"] == 40
    assert resumed["resumed_from"] == killed_at
    assert resumed["first"]["loss"] == pytest.approx(reference["first"]["loss"])  # history carried over
    assert resumed["final"]["loss"] == pytest.approx(reference["final"]["loss"], rel=1e-3, abs=1e-4)
    a, b = weights(out), weights(ref_out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
