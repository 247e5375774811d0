"""`slimlm pipeline`: a tiny pipeline end to end (one variant fails, its child is skipped, the others go
on), the re-run rule, an export that fails its integrity check, refusals before any work, shipped YAMLs."""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from slimlm.recipes import pipeline
from slimlm.recipes.cli import main
from slimlm.toolkit.export import read
from slimlm.toolkit.models import tiny_model

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))
FAST = {"window": 32, "max-windows": 2, "eval-batch-size": 2, "prompt-len": 8, "gen-len": 3, "concurrency": 2,
        "num-requests": 2, "reps": 1, "dtype": "float32", "threads": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model, tok = tiny_model("llama", num_hidden_layers=2)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture
def fake_serving_memory(monkeypatch):
    """Serving memory (measured for real in the end-to-end and draft tests) faked: a spawned process per model."""
    from slimlm.recipes import compare

    monkeypatch.setattr(compare, "measure_serving_memory", lambda spec, settings, plan=None: {
        "serving_bytes": 2**21, "serving_peak_bytes": 2**22, "kv_cache_bytes": 2**10, "exact": True})


def write_config(root, variants, name="pipe.yaml", out="out"):
    cfg = {"base": str(root / "tiny"), "out": str(root / out), "variants": variants,
           "compare": {**FAST, "data": [str(root / "text.txt")]}}
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def variants(root):
    return [{"name": "int8", "recipe": "quantize", "args": {"method": "rtn", "bits": 8, "group-size": 32, "no-eval": True}},
            {"name": "broken", "recipe": "prune",  # fails: its launcher is not installed
             "launcher": "no-such-launcher --num_gpus 8", "args": {"target-params": 0.5}},
            {"name": "broken-child", "recipe": "quantize", "from": "broken", "args": {"method": "rtn", "bits": 8}}]


def test_tiny_pipeline_end_to_end_then_rerun(base, monkeypatch, capsys):
    config = write_config(base, variants(base))
    out = base / "out"
    real_run_step, ran = pipeline.run_step, []

    def counting(cmd, log, show=None):
        ran.append(log.stem)
        return real_run_step(cmd, log, show)

    monkeypatch.setattr(pipeline, "run_step", counting)
    assert main(["pipeline", str(config)]) == 1  # one variant failed: the run says so
    assert ran == ["int8", "broken"]  # the child of a failed variant never runs
    err = capsys.readouterr().err
    assert "broken" in err and "failed" in err

    state = json.loads((out / "pipeline.json").read_text())
    v = state["variants"]
    assert v["int8"]["status"] == "done" and v["int8"]["command"].split()[3:5] == ["quantize", str(base / "tiny")]
    assert v["int8"]["seconds"] > 0 and v["int8"]["cpu_seconds"] > 0
    assert v["broken"]["status"] == "failed" and "cannot start no-such-launcher" in v["broken"]["error"]
    assert v["broken-child"] == {"recipe": "quantize", "from": "broken", "status": "failed",
                                 "error": "parent broken failed", "seconds": 0.0}
    assert "verified" in (out / "logs" / "int8.log").read_text()  # the child's output, teed
    assert read(out / "variants" / "int8").command.startswith("slimlm quantize ")  # as a user would type it

    md = (out / "compare" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| tiny (base)") for r in rows) and any(r.startswith("| int8 |") for r in rows)
    assert "## Variants" in md and "no-such-launcher" in md and "parent broken failed" in md
    report = json.loads((out / "compare" / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["tiny", "int8"]
    assert report["pipeline"]["variants"]["broken"]["status"] == "failed"
    assert (out / "compare" / "pareto.png").is_file()

    # Re-run, same config: int8 is skipped (its export verifies); broken runs again, and this time its
    # "recipe" leaves an export with a corrupted tensor file, which the integrity check refuses.
    ran.clear()

    def corrupting(cmd, log, show=None):
        ran.append(log.stem)
        target = cmd[cmd.index("--out") + 1]
        shutil.copytree(out / "variants" / "int8", target)
        tensor = next(p for p in sorted(pipeline.Path(target).glob("*.safetensors")))
        tensor.write_bytes(tensor.read_bytes()[:-8] + b"\0" * 8)
        return 0, []

    monkeypatch.setattr(pipeline, "run_step", corrupting)
    assert main(["pipeline", str(config)]) == 1
    assert ran == ["broken"]
    v = json.loads((out / "pipeline.json").read_text())["variants"]
    assert v["int8"]["status"] == "done" and v["int8"]["skipped"]
    assert v["broken"]["status"] == "failed" and "integrity check" in v["broken"]["error"]


@pytest.mark.timeout(1200)  # four pipeline runs and their compares: 270 s on a quiet 2-core machine, twice that loaded
def test_a_rerun_makes_only_the_variants_that_changed(base, monkeypatch, capsys, fake_serving_memory):
    vs = [{"name": "pruned", "recipe": "prune", "args": {"target-params": 0.6, "eval-windows": 0}},
          {"name": "pruned-q8", "recipe": "quantize", "from": "pruned",
           "args": {"method": "rtn", "bits": 8, "group-size": -1, "no-eval": True}},
          {"name": "q4", "recipe": "quantize", "args": {"method": "rtn", "bits": 4, "group-size": 32, "no-eval": True}}]
    config = write_config(base, vs, name="change.yaml", out="change_out")
    real_run_step, ran = pipeline.run_step, []
    monkeypatch.setattr(pipeline, "run_step", lambda cmd, log, show=None: ran.append(log.stem) or real_run_step(cmd, log, show))
    assert main(["pipeline", str(config)]) == 0 and ran == ["pruned", "pruned-q8", "q4"]
    ran.clear()
    vs[0]["args"]["target-params"] = 0.7  # pruned changes: it and its child are made again, q4 is not
    vs.append({"name": "q4-more", "recipe": "quantize", "args": {"method": "rtn", "bits": 4, "no-eval": True}})
    config = write_config(base, vs, name="change.yaml", out="change_out")
    capsys.readouterr()
    assert main(["pipeline", str(config), "--dry-run"]) == 0 and ran == []  # it says what a run would reuse
    lines = capsys.readouterr().out.splitlines()
    plan = {line[2:]: "reused" if after.startswith("# made by an earlier run") else "made"
            for line, after in zip(lines, lines[1:]) if line[2:] in {v["name"] for v in vs}}
    assert plan == {"pruned": "made", "pruned-q8": "made", "q4": "reused", "q4-more": "made"}, plan
    assert main(["pipeline", str(config)]) == 0 and ran == ["pruned", "pruned-q8", "q4-more"]
    state = json.loads((base / "change_out" / "pipeline.json").read_text())["variants"]
    assert state["q4"]["skipped"] and not state["pruned"].get("skipped")
    ran.clear()
    moved = base / "moved_out"  # the folder copied elsewhere: its exports are reused from there, not from the old one
    shutil.copytree(base / "change_out", moved)
    assert main(["pipeline", str(config), "--out", str(moved)]) == 0 and ran == []
    specs = [m["spec"] for m in json.loads((moved / "compare" / "report.json").read_text())["models"][1:]]
    assert specs and all(s.startswith(str(moved.resolve())) or s.startswith(str(moved)) for s in specs), specs
    weights = base / "tiny" / "model.safetensors"  # the base retrained in place (here: only its time moves)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(["pipeline", str(config)]) == 0 and ran == ["pruned", "pruned-q8", "q4", "q4-more"]
    ran.clear()
    cfg = yaml.safe_load(config.read_text())  # other compare settings: nothing made, every model measured again
    cfg["compare"]["gen-len"] = 4
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["pipeline", str(config)]) == 0 and ran == []
    settings = json.loads((base / "change_out" / "compare" / "settings.json").read_text())
    assert settings["gen_len"] == 4
    cfg["base"] = str(base / "change_out" / "variants" / "q4")  # another base: another pipeline, refused
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    refused(capsys, [config], "another base model", "--overwrite")


def test_another_config_in_the_same_folder_keeps_the_earlier_variants(base, monkeypatch, capsys, fake_serving_memory):
    """A second config of the same base in the same out folder dropped the first one's records without a word (its
    exports stayed on disk, untracked), so running the first again made them anew."""
    q4 = {"name": "q4", "recipe": "quantize", "args": {"method": "rtn", "bits": 4, "group-size": 32, "no-eval": True}}
    q8 = {"name": "q8", "recipe": "quantize", "args": {"method": "rtn", "bits": 8, "group-size": 32, "no-eval": True}}
    first = write_config(base, [q4], name="first.yaml", out="shared_out")
    second = write_config(base, [q8], name="second.yaml", out="shared_out")
    real_run_step, ran = pipeline.run_step, []
    monkeypatch.setattr(pipeline, "run_step", lambda cmd, log, show=None: ran.append(log.stem) or real_run_step(cmd, log, show))
    assert main(["pipeline", str(first)]) == 0 and ran == ["q4"]
    capsys.readouterr()
    assert main(["pipeline", str(second)]) == 0 and ran == ["q4", "q8"]
    err = capsys.readouterr().err.replace("\n", " ")
    assert "holds variant(s) q4 that" in err and "first.yaml" in err
    state = json.loads((base / "shared_out" / "pipeline.json").read_text())
    assert set(state["variants"]) == {"q4", "q8"}
    report = json.loads((base / "shared_out" / "compare" / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["tiny", "q8"]  # the report is this config's
    assert main(["pipeline", str(first)]) == 0 and ran == ["q4", "q8"]  # q4 reused, not made again


def test_args_become_the_recipes_flags_and_overrides():
    assert pipeline._flag_args({"group-size": 64, "sym": True, "act_order": False, "eval-windows": 0,
                                "skip": ["a", "b"], "seed": None}) == [
        "--group-size", "64", "--sym", "--eval-windows", "0", "--skip", "a", "--skip", "b"]
    assert pipeline._override_args({"lr": 1e-3, "progress": False, "loss": {"kind": "js", "chunk_size": None}}) == [
        "lr=0.001", "progress=false", "loss.kind=js", "loss.chunk_size=null"]


def test_the_error_is_the_childs_own_error_line(tmp_path):
    tail = ["loading", "slimlm quantize: error: text source 'x.txt' does not exist.", "Check the path.", ""]
    said = pipeline.error_of(2, tail, tmp_path / "v.log")
    assert said.startswith("slimlm quantize: error: text source 'x.txt' does not exist. Check the path.")
    assert "exit code 2" in said and "v.log" in said
    assert pipeline.error_of(137, ["step 3/16"], tmp_path / "v.log").startswith("step 3/16 (exit code 137")


def refused(capsys, argv, *words):
    assert main(["pipeline", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    return err


@pytest.mark.parametrize("change, words", [
    (lambda vs: vs[0].update(recipe="sparsify"), ["unknown recipe 'sparsify'", "quantize, prune, distill"]),
    (lambda vs: vs[0].pop("recipe"), ["variant int8: no `recipe:`", "quantize, prune, distill"]),
    (lambda vs: vs[2].update({"from": "nowhere"}), ["from: nowhere", "names no variant"]),
    (lambda vs: vs[0]["args"].update(bitz=4), ["unrecognized arguments: --bitz"]),
    (lambda vs: vs[0]["args"].update(out="x"), ["without"]),
    (lambda vs: vs[1].update(name="int8"), ["unique `name`"]),
    (lambda vs: vs.append({"name": "d", "draft": "nowhere"}), ["draft: nowhere", "names no variant"]),
    (lambda vs: vs.append({"name": "d", "draft": "int8", "recipe": "quantize"}), ["makes nothing", "recipe"]),
    (lambda vs: vs.append({"name": "n", "ngram": "yes"}), ["ngram: true", "makes nothing"]),
    (lambda vs: vs.extend([{"name": "n", "ngram": True}, {"name": "d", "draft": "n"}]), ["`draft: n`", "makes nothing"]),
    (lambda vs: vs.extend([{"name": "n", "ngram": True}, {"name": "n2", "ngram": True}]),
     ["times the same model the same way as variant n"]),
    (lambda vs: vs.append({"name": "n", "ngram": "yes", "draft": "int8"}), ["`ngram` takes no value but true"]),
    (lambda vs: vs.extend([{"name": "n", "ngram": True}, {"name": "q", "recipe": "quantize", "from": "n",
                                                           "args": {"method": "rtn", "bits": 8}}]),
     ["from: n", "makes nothing"]),
    (lambda vs: vs.append({"name": "d", "recipe": "distill", "config": "configs/distill/smollm2-135m.yaml",
                           "args": {"loss": {"kind": "forward_kl", "tempo": 2}}}), ["unknown setting 'loss.tempo'"]),
    # values, checked as each recipe checks them before it loads a model (they failed only when their turn came)
    (lambda vs: vs.append({"name": "d", "recipe": "distill", "config": "configs/distill/smollm2-135m.yaml",
                           "args": {"max_steps": "two"}}), ["variant d:", "max_steps must be int; got 'two'"]),
    (lambda vs: vs.append({"name": "d", "recipe": "distill", "config": "configs/distill/smollm2-135m.yaml",
                           "args": {"loss": {"kind": "bogus_kl"}}}), ["variant d:", "unknown loss.kind 'bogus_kl'"]),
    (lambda vs: vs[1]["args"].update({"target-params": "half"}), ["variant broken:", "parameter target 'half'"]),
    (lambda vs: vs[0]["args"].update({"eval-windows": 0, "no-eval": False}), ["variant int8:", "--eval-windows must be >= 1"]),
    (lambda vs: vs.append({"name": "qq", "recipe": "quantize", "from": "int8", "args": {"method": "rtn"}}),
     ["variant qq: `from: int8` is quantized", "quantize last"]),
    # data sources that name nothing readable, refused before the first variant's work
    (lambda vs: vs[0]["args"].update({"eval-data": "builtin:wkii", "no-eval": False}),
     ["variant int8: --eval-data:", "wkii"]),
    (lambda vs: vs[1]["args"].update({"data": "no/such/file.txt"}), ["variant broken: data:", "no/such/file.txt"]),
    (lambda vs: vs.append({"name": "d", "recipe": "distill", "config": "configs/distill/smollm2-135m.yaml",
                           "args": {"data": "builtin:wkii"}}), ["variant d: data:", "wkii"]),
])
def test_bad_configs_are_refused_before_any_work(base, monkeypatch, capsys, change, words):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("work started"))
    vs = variants(base)
    change(vs)
    refused(capsys, [write_config(base, vs, name="bad.yaml", out="bad_out")], *words)
    assert not (base / "bad_out").exists()


def test_a_typo_inside_a_variants_config_file_is_refused_before_any_work(base, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("work started"))
    mine = base / "my-distill.yaml"
    mine.write_text((Path(__file__).parents[2] / "configs/distill/smollm2-135m.yaml").read_text() + "max_stepz: 20\n")
    vs = variants(base)[:1] + [{"name": "d", "recipe": "distill", "config": str(mine)}]
    refused(capsys, [write_config(base, vs, name="typo.yaml", out="typo_out")], "variant d:", "max_stepz")
    assert not (base / "typo_out").exists()


def test_a_bad_value_names_the_users_settings_not_the_pipelines_stand_ins(base, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("work started"))
    vs = variants(base)[:1] + [{"name": "d", "recipe": "distill", "config": "configs/distill/smollm2-135m.yaml",
                                "args": {"max_steps": "two"}}]
    err = refused(capsys, [write_config(base, vs, name="val.yaml", out="val_out")], "with max_steps=two:")
    assert "MODEL" not in err and "OUT" not in err
    vs[1]["args"] = {"student": str(base / "tiny"), "max_steps": "two"}  # a model key of the user's own
    err = refused(capsys, [write_config(base, vs, name="val.yaml", out="val_out")],
                  f"with student={base / 'tiny'} max_steps=two:")
    assert "OUT" not in err and "BASE" not in err


def test_a_bad_compare_key_points_at_compares_options(base, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("work started"))
    config = write_config(base, variants(base)[:1], name="badcmp.yaml", out="badcmp_out")
    cfg = yaml.safe_load(config.read_text())
    cfg["compare"]["max-windowz"] = 3
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    refused(capsys, [config], "unrecognized arguments: --max-windowz", "Keys under `compare:`", "slimlm compare --help")


def test_unknown_model_and_other_configs_out_are_refused(base, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_step", lambda *a, **k: pytest.fail("work started"))
    config = write_config(base, variants(base)[:1], name="unknown.yaml", out="u_out")
    config.write_text(config.read_text().replace(str(base / "tiny"), "no-such-model"))
    refused(capsys, [config], "unknown.yaml: base: unknown model 'no-such-model'")

    out = base / "other_out"
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"config": "old.yaml", "sha256": "0123456789abcdef"}))
    config = write_config(base, variants(base)[:1], name="other.yaml", out="other_out")
    refused(capsys, [config], "another config", "another base model", "--overwrite")
    (out / "pipeline.json").write_text('{"config": "old.yaml", "sha')  # cut off while written
    refused(capsys, [config], "pipeline.json is not valid JSON", "--overwrite")
    (out / "pipeline.json").unlink()
    (out / "notes.txt").write_text("mine")
    refused(capsys, [config], "holds no slimlm pipeline")


def test_compare_speculative_off_reaches_the_compare_settings(base):
    """YAML reads a bare `off` as false, which would drop the flag: `speculative: off` must still turn it off."""
    config = write_config(base, variants(base)[:1], name="spec.yaml")
    text = config.read_text()
    for value, want in (("off", "off"), ("'off'", "off"), ("auto", None)):
        config.write_text(text.replace("compare:\n", f"compare:\n  speculative: {value}\n"))
        assert pipeline.load_pipeline(config)["compare"].get("speculative") == want
    config.write_text(text.replace("compare:\n", "compare:\n  speculative: self\n"))
    with pytest.raises(pipeline.SlimlmError, match="speculative"):
        pipeline.load_pipeline(config)


def test_shipped_configs_validate(capsys):
    plan = pipeline.load_pipeline("configs/pipeline/quickstart.yaml")
    assert plan["base"] == "smollm2-135m" and len(plan["variants"]) >= 4
    assert {v["recipe"] for v in plan["variants"]} >= {"quantize", "prune", "distill"}
    # at least 3 speed repetitions in all, over more than one load of the models (their spread)
    assert plan["compare"]["reps"] * plan["compare"].get("speed_rounds", 1) >= 3
    assert plan["compare"].get("speed_rounds", 1) > 1

    # A hub id is resolved by name only (nothing is fetched), so the cluster config validates offline.
    assert main(["pipeline", "configs/pipeline/cluster-example.yaml", "--dry-run", "--out", "/nonexistent/x"]) == 0
    printed = capsys.readouterr().out
    deepspeed = [line for line in printed.splitlines() if line.startswith("deepspeed --num_gpus 8 ")]
    assert len(deepspeed) == 2 and all("recipes/distill.py --config " in line for line in deepspeed)
    assert "student=/nonexistent/x/variants/pruned-4b teacher=meta-llama/Llama-3.1-8B-Instruct" in printed
    assert "quantize /nonexistent/x/variants/pruned-4b-distilled/model --out" in printed
    # its distillation corpus lives on the cluster: a dry run here says so; a run here refuses before any work
    assert "# note: a run here would stop before any work: " in printed and "data/distill-corpus.parquet" in printed
    assert main(["pipeline", "configs/pipeline/cluster-example.yaml", "--out", "/nonexistent/x"]) == 2
    assert "data/distill-corpus.parquet' does not exist" in capsys.readouterr().err


def test_shipped_configs_work_from_another_folder(tmp_path, monkeypatch):
    # Their `config:` paths are written from the project's root (configs/prune/...): found from anywhere.
    quickstart = (Path.cwd() / "configs/pipeline/quickstart.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    plan = pipeline.load_pipeline(quickstart)
    configs = [v["config"] for v in plan["variants"] if v.get("config")]
    assert configs and all(Path(c).is_file() and "/configs/" in c for c in configs)


def test_a_qat_variant_runs_as_slimlm_qat(tmp_path, capsys):
    cfg = tmp_path / "qat.yaml"
    cfg.write_text("base: smollm2-135m\nvariants:\n"
                   "  - {name: int4-qat, recipe: qat, config: configs/qat/smollm2-135m.yaml,"
                   " args: {max_steps: 3, quant.group_size: 128}}\n")
    assert main(["pipeline", str(cfg), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if " qat " in x)
    assert "qat --config " in line and "configs/qat/smollm2-135m.yaml" in line and "max_steps=3" in line
    assert "quant.group_size=128" in line and "model=smollm2-135m" in line
    assert f"out_dir={tmp_path / 'o' / 'variants' / 'int4-qat'}" in line
    cfg.write_text("base: smollm2-135m\nvariants:\n"
                   "  - {name: q, recipe: qat, config: configs/qat/smollm2-135m.yaml, args: {quant.nope: 1}}\n")
    assert main(["pipeline", str(cfg), "--dry-run", "--out", str(tmp_path / "o2")]) == 2


def test_an_early_exit_variant_runs_as_slimlm_early_exit(tmp_path, capsys):
    cfg = tmp_path / "ee.yaml"
    cfg.write_text("base: smollm2-135m\nvariants:\n"
                   "  - {name: exits, recipe: early-exit, config: configs/early_exit/smollm2-135m.yaml,"
                   " args: {max_steps: 2}}\n")
    assert main(["pipeline", str(cfg), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if " early-exit " in x)
    assert "early-exit --config " in line and "configs/early_exit/smollm2-135m.yaml" in line and "max_steps=2" in line
    assert f"out_dir={tmp_path / 'o' / 'variants' / 'exits'}" in line and "model=smollm2-135m" in line
    cfg.write_text("base: smollm2-135m\nvariants:\n"
                   "  - {name: exits, recipe: early-exit, config: configs/early_exit/smollm2-135m.yaml,"
                   " args: {no_such_key: 1}}\n")
    assert main(["pipeline", str(cfg), "--dry-run", "--out", str(tmp_path / "o2")]) == 2


def test_a_draft_variant_times_the_base_with_another_variant_as_its_draft(base, monkeypatch, capsys):
    """`{name, draft: V}` makes nothing; compare times the base with V's export as its draft model. A draft
    variant of a failed variant fails with it; --dry-run says what it will time."""
    from slimlm.serve.engine import draft_speculative

    monkeypatch.setattr(draft_speculative, "decode_step_seconds", lambda models, block_size: [1.0, 0.1])
    vs = variants(base) + [{"name": "drafting", "draft": "int8"}, {"name": "drafting-broken", "draft": "broken"},
                           {"name": "drafting-ngram", "draft": "int8", "ngram": True}]
    config = write_config(base, vs, name="draft.yaml", out="draft_out")
    out = base / "draft_out"
    assert main(["pipeline", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"# nothing to make: compare times {base / 'tiny'} with {out / 'variants' / 'int8'} as its draft model\n" \
        in printed
    assert f"{out / 'variants' / 'int8'} as its draft model where prompt lookup finds no draft" in printed
    assert main(["pipeline", str(config)]) == 1  # `broken` fails
    state = json.loads((out / "pipeline.json").read_text())["variants"]
    assert state["drafting"]["status"] == "done" and state["drafting"]["recipe"] == "draft"
    assert state["drafting"]["export"] == f"{base / 'tiny'}+draft:{out / 'variants' / 'int8'}"
    assert state["drafting-broken"] == {"recipe": "draft", "from": None, "status": "failed",
                                        "error": "draft broken failed", "seconds": 0.0}
    report = json.loads((out / "compare" / "report.json").read_text())
    drafting = next(m for m in report["models"] if m["label"] == "drafting")
    assert drafting["spec"] == str(base / "tiny") and drafting["draft"] == str(out / "variants" / "int8")
    assert drafting["speed"]["speculation"]["drafted_tokens"] > 0
    # serving memory of the drafting row: measured in a process serving the base with the draft beside it
    assert drafting["serving_memory"]["serving_bytes"] > 0 and report["models"][0]["serving_memory"]["serving_bytes"] > 0
    assert "| drafting (draft-spec) |" in (out / "compare" / "report.md").read_text()
    both = next(m for m in report["models"] if m["label"] == "drafting-ngram")
    assert state["drafting-ngram"]["export"] == f"{base / 'tiny'}+draft:{out / 'variants' / 'int8'}+ngram"
    assert both["speed"]["speculation"]["prompt_lookup"] == 3 and both["draft"] == str(out / "variants" / "int8")
    assert "| drafting-ngram (draft+ngram-spec) |" in (out / "compare" / "report.md").read_text()


def test_an_ngram_variant_times_its_model_with_prompt_lookup(base, capsys, fake_serving_memory):
    """`{name, ngram: true, from: V}` makes nothing; compare times V's export with prompt-lookup drafts and takes
    V's accuracy; --dry-run says what it will time."""
    vs = variants(base)[:1] + [{"name": "int8-ngram", "ngram": True, "from": "int8"}]
    config = write_config(base, vs, name="ngram.yaml", out="ngram_out")
    out = base / "ngram_out"
    assert main(["pipeline", str(config), "--dry-run"]) == 0
    assert f"# nothing to make: compare times {out / 'variants' / 'int8'} with prompt-lookup drafts" \
        in capsys.readouterr().out
    assert main(["pipeline", str(config)]) == 0
    state = json.loads((out / "pipeline.json").read_text())["variants"]
    assert state["int8-ngram"] == {"recipe": "ngram", "from": "int8", "status": "done", "seconds": 0.0,
                                   "export": f"{out / 'variants' / 'int8'}+ngram"}
    report = json.loads((out / "compare" / "report.json").read_text())
    looked_up = next(m for m in report["models"] if m["label"] == "int8-ngram")
    assert looked_up["spec"] == str(out / "variants" / "int8") and looked_up["accuracy_of"] == "int8"
    assert looked_up["speed"]["speculation"]["prompt_lookup"] == 3
    assert "| int8-ngram (ngram-spec) |" in (out / "compare" / "report.md").read_text()
