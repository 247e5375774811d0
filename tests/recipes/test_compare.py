"""slimlm compare: the report on tiny models, the cache and resume rule, the Pareto front, and user errors.

One test measures for real (two tiny models, each evaluated in a spawned process); the others replace
`measure_accuracy` and `measure_speed` with counting fakes, so they check what is measured, not how.
"""
import argparse
import json
import os
import statistics

import pytest

from slimlm.recipes import compare
from slimlm.recipes.cli import VERBS, main
from slimlm.recipes.compare_report import pareto_front
from slimlm.toolkit.errors import SlimlmError
from slimlm.toolkit.models import tiny_model

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))
FAST = ["--window", "32", "--max-windows", "2", "--eval-batch-size", "2", "--prompt-len", "8", "--gen-len", "3",
        "--concurrency", "2", "--num-requests", "2", "--reps", "1", "--dtype", "float32"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="slimlm")
    compare.add_compare(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["compare", *map(str, argv)])
    args.command_line = "slimlm compare " + " ".join(map(str, argv))
    return args


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny Llama folders: the base (2 layers), a smaller (1) and a larger (3) variant."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed, layers in (("base", 0, 2), ("small", 1, 1), ("large", 2, 3)):
        model, tok = tiny_model("llama", seed=seed, num_hidden_layers=layers)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "held_out.txt"
    f.write_text(TEXT)
    return f


def test_report_has_every_figure_with_the_base_at_1x(models, text_file, tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": "The fox", "choices": [" jumps", " sleeps"], "label": i % 2})
                               for i in range(4)))
    out = tmp_path / "report"
    args = parse([models["base"], models["small"], "--data", text_file, "--tasks", tasks, "--out", out, *FAST,
                  "--spread-windows"])
    assert compare.run_compare(args) == 0

    md = (out / "report.md").read_text()
    assert "at most 2 windows of 32 tokens of the validation split of " in md and "(spread evenly over it)" in md
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    for column in ("params", "disk MB", "serving MB", "eval peak MB", "ppl held_out.txt", "acc t.jsonl", "acc_norm t.jsonl",
                   "batch-1 decode tok/s",
                   "batch-1 tok/s with prefill", "c=2 tok/s", "TTFT p50 ms"):
        assert column in header
    base_row = next(line for line in md.splitlines() if line.startswith("| base (base)"))
    cells = [c.strip() for c in base_row.strip("|").split("|")][1:]
    assert len(cells) == header.count("|") - 2 and all("(1.00x)" in c for c in cells)
    assert "| small |" in md
    assert "[" in base_row  # speed cells carry [min, max]

    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("slimlm compare") and report["machine"]["cpus"]
    assert report["settings"]["window"] == 32 and report["settings"]["num_requests"] == 2
    base, small = report["models"]
    assert all(f["ratio"] == pytest.approx(1.0) for f in base["figures"].values())
    assert small["params"] < base["params"] and small["figures"]["params"]["ratio"] < 1
    assert base["memory"]["load_eval_bytes"] > 0 and base["disk_bytes"] > 0
    # Serving memory: the engine's KV cache for 2 requests of 8 + 3 tokens (2 x 2 blocks + 1 spare, 16 tokens
    # each) in float32, and at least that much resident.
    serving = base["serving_memory"]
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 KV heads of 16 dims (tiny_model's), float32
    assert serving["kv_cache_bytes"] == 5 * 16 * per_token and serving["exact"] is True
    assert serving["serving_peak_bytes"] >= serving["serving_bytes"] >= serving["kv_cache_bytes"]
    assert base["figures"]["serving_mb"]["value"] == pytest.approx(serving["serving_bytes"] / 2**20)
    assert "Serving MB: resident memory (RSS) of a fresh process holding the model in slimlm's engine" in md
    # Both batch-1 figures are measured (which is faster is a timing, for benchmarks: with 3 new tokens one stall of
    # a loaded machine in a decode step can make 1 / TPOT the slower)
    assert base["figures"]["batch1_tok_s"]["value"] > 0 and base["figures"]["batch1_decode_tok_s"]["value"] > 0
    assert 1.0 < base["figures"]["ppl:held_out.txt"]["value"] < 400  # a random byte model is near-uniform
    assert set(report["pareto"]["front"]) <= {"base", "small"} and report["pareto"]["front"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cache").glob("*.json"))) == 2
    printed = capsys.readouterr().out
    assert "ppl held_out.txt" in printed and "1.00x" in printed


class Fakes:
    """Counting stand-ins for the measurements. The base runs at 100 tok/s in the first run and 50 after,
    so a ratio divided by the wrong run's base shows. `measure_speeds` (alternated repetitions) gives
    each model the per-repetition values in `reps` where it names the model, else its figure twice."""

    def __init__(self, monkeypatch, fail_speed_on=None, reps=None):
        self.accuracy, self.speed, self.fail_speed_on, self.reps = [], [], fail_speed_on, reps or {}
        self.together = []  # the model lists measure_speeds was called with
        monkeypatch.setattr(compare, "measure_accuracy", self.measure_accuracy)
        monkeypatch.setattr(compare, "measure_speed", self.measure_speed)
        monkeypatch.setattr(compare, "measure_speeds", self.measure_speeds)
        self.memory = []
        monkeypatch.setattr(compare, "measure_serving_memory", self.measure_serving_memory)

    def measure_serving_memory(self, spec, settings, plan=None):
        self.memory.append(os.path.basename(spec))
        return fake_serving_memory(spec, settings, plan)

    def measure_speeds(self, specs, settings, progress=None, plans=None):
        self.together.append([os.path.basename(s) for s in specs])
        plans = plans or [None] * len(specs)
        results = [self.measure_speed(spec, settings, plan=plan) for spec, plan in zip(specs, plans)]
        for spec, r in zip(specs, results):
            batch1 = self.reps.get(os.path.basename(spec), [r["figures"]["batch1_decode_tok_s"]["median"]] * 2)
            r["values"] = {key: [f["median"]] * len(batch1) for key, f in r["figures"].items()}
            r["values"]["batch1_decode_tok_s"] = batch1
            r["figures"]["batch1_decode_tok_s"] = {"median": statistics.median(batch1), "min": min(batch1),
                                                   "max": max(batch1)}
        return results

    def measure_accuracy(self, spec, settings):
        self.accuracy.append(os.path.basename(spec))
        ppl = {"base": 6.8, "small": 8.0, "large": 6.5}[os.path.basename(spec)]
        return {"accuracy": {"perplexity": {"wiki": {"perplexity": ppl}}, "tasks": {}}, "params": 1000,
                "memory": {"load_eval_bytes": 2**20}}

    def measure_speed(self, spec, settings, progress=None, plan=None):
        name = os.path.basename(spec)
        assert plan is None  # these tests compare plain folders
        if name == self.fail_speed_on:
            raise KeyboardInterrupt
        self.speed.append(name)
        tok_s = {"small": 200.0, "large": 40.0}.get(name) or (100.0 if self.speed.count("base") == 1 else 50.0)
        spread = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
        return {"figures": {"batch1_decode_tok_s": spread(tok_s), "batch1_tok_s": spread(0.8 * tok_s),
                            "online_tok_s": spread(4 * tok_s), "ttft_p50_ms": spread(10.0)}}


def figures(out):
    return {m["label"]: m["figures"] for m in json.loads((out / "report.json").read_text())["models"]}


@pytest.mark.parametrize("order", ["sequential", "alternate"])
def test_rerun_with_one_more_model_measures_only_it_and_the_base(order, models, tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    out = tmp_path / "c"
    assert compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST, "--speed-order", order])) == 0
    assert fakes.accuracy == fakes.memory == ["base", "small"] and fakes.speed == ["base", "small"]
    assert fakes.together == ([] if order == "sequential" else [["base", "small"]])

    assert compare.run_compare(parse([models["base"], models["small"], models["large"], "--out", out, *FAST,
                                      "--speed-order", order])) == 0
    assert fakes.accuracy == fakes.memory == ["base", "small", "large"]  # the base's came from the cache
    assert fakes.speed == ["base", "small", "base", "large"]  # the base's speed never does
    f = figures(out)
    assert f["small"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(2.0)  # 200 / the base of its own run (100)
    assert f["small"]["batch1_decode_tok_s"]["earlier_run"] is True
    assert f["large"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(0.8)  # 40 / the base of this run (50)
    assert f["large"]["batch1_decode_tok_s"]["earlier_run"] is False
    assert f["small"]["ppl:wiki"]["ratio"] == pytest.approx(8.0 / 6.8)
    assert f["small"]["serving_mb"]["value"] == 1 and f["small"]["serving_mb"]["ratio"] == pytest.approx(0.25)
    report = json.loads((out / "report.json").read_text())
    # quality against serving memory: small (1 MB, ppl 8.0) and large (8 MB, 6.5) are each best in one; the base
    # (4 MB, 6.8) is beaten by neither alone, so all three are on the front, lowest memory first
    assert report["pareto_memory"]["front"] == ["small", "base", "large"]
    assert report["pareto_memory"]["x"] == "serving_mb ratio"
    assert "Pareto front (quality against serving memory): small, base, large" in (out / "report.md").read_text()
    assert "†" in (out / "report.md").read_text()
    assert f["small"]["batch1_decode_tok_s"]["base_then"] == pytest.approx(100)  # named in its cell: beside this
    assert "x of base 100.0) †" in (out / "report.md").read_text().replace("2.00x, 2.00-2.00", "2.00x")  # run's 50

    # The same compare again: every speed is cached, so nothing is timed, and each ratio stays its own run's.
    assert compare.run_compare(parse([models["base"], models["small"], models["large"], "--out", out, *FAST,
                                      "--speed-order", order])) == 0
    assert fakes.speed == ["base", "small", "base", "large"] and fakes.accuracy == ["base", "small", "large"]
    f = figures(out)
    assert f["small"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(2.0)
    assert f["large"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(0.8)
    assert f["large"]["batch1_decode_tok_s"]["earlier_run"] is True

    # A changed model is a different model: rewriting a file of `small` measures it again.
    config = models["small"] / "config.json"
    config.write_text(config.read_text())
    os.utime(config, ns=(0, config.stat().st_mtime_ns + 1000))
    assert compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST, "--speed-order", order])) == 0
    assert fakes.accuracy[-1] == "small" and fakes.speed[-2:] == ["base", "small"]


@pytest.mark.parametrize("order", ["sequential", "alternate"])
def test_an_interrupted_compare_resumes(order, models, tmp_path, monkeypatch):
    out = tmp_path / "c"
    argv = [models["base"], models["small"], models["large"], "--out", out, *FAST, "--speed-order", order]
    first = Fakes(monkeypatch, fail_speed_on="large")
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(parse(argv))
    assert first.accuracy == ["base", "small", "large"] and first.speed == ["base", "small"]
    again = Fakes(monkeypatch)
    assert compare.run_compare(parse(argv)) == 0
    assert again.accuracy == []
    # Sequential runs cached small's speed before large failed; alternated ones cache all at the end.
    assert again.speed == (["base", "large"] if order == "sequential" else ["base", "small", "large"])
    assert figures(out)["large"]["batch1_decode_tok_s"]["earlier_run"] is False


def test_alternated_repetitions_give_the_median_of_per_repetition_ratios(models, tmp_path, monkeypatch):
    """The load halves the machine's speed in repetition 2: the ratio of medians (150 / 80) would say 1.88x,
    the per-repetition ratios (1.5, 2.2, 2.5) give 2.2x with their range."""
    Fakes(monkeypatch, reps={"base": [100.0, 50.0, 80.0], "small": [150.0, 110.0, 200.0]})
    out = tmp_path / "c"
    assert compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST, "--speed-order", "alternate"])) == 0
    f = figures(out)
    assert f["small"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(2.2)
    assert (f["small"]["batch1_decode_tok_s"]["ratio_min"], f["small"]["batch1_decode_tok_s"]["ratio_max"]) == pytest.approx((1.5, 2.5))
    assert f["base"]["batch1_decode_tok_s"]["ratio"] == pytest.approx(1.0) and "ratio_min" not in f["base"]["batch1_decode_tok_s"]
    md = (out / "report.md").read_text()
    assert "(2.20x, 1.50-2.50)" in md and "median of the per-repetition ratios" in md
    pareto = json.loads((out / "report.json").read_text())["pareto"]
    assert pareto["x"] == "batch1_decode_tok_s ratio" and pareto["points"]["small"][0] == pytest.approx(2.2)


def test_a_cached_speed_without_the_decode_figure_is_measured_again(models, tmp_path, monkeypatch):
    """A cache written before batch-1 decode tok/s existed lacks that figure: its model is measured again."""
    fakes = Fakes(monkeypatch)
    out = tmp_path / "c"
    argv = [models["base"], models["small"], models["large"], "--out", out, *FAST, "--speed-order", "sequential"]
    assert compare.run_compare(parse(argv)) == 0
    for path in (out / "cache").glob("*.json"):
        entry = json.loads(path.read_text())
        if entry["label"] == "small":
            del entry["speed"]["figures"]["batch1_decode_tok_s"]
            path.write_text(json.dumps(entry))
    assert compare.run_compare(parse(argv)) == 0
    assert fakes.speed[3:] == ["base", "small"]  # large's cached speed (with the figure) is reused
    assert figures(out)["small"]["batch1_decode_tok_s"]["earlier_run"] is False


def test_auto_alternates_only_where_the_models_fit_in_memory(models, tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    argv = [models["base"], models["small"], "--out", tmp_path / "a", *FAST]
    assert compare.run_compare(parse(argv)) == 0  # two tiny models fit
    assert fakes.together == [["base", "small"]]
    monkeypatch.setattr(compare, "disk_bytes", lambda model: 2**50)  # a petabyte each: never
    argv[3] = tmp_path / "b"
    assert compare.run_compare(parse(argv)) == 0
    assert fakes.together == [["base", "small"]] and fakes.speed[-2:] == ["base", "small"]


@pytest.mark.parametrize("stage, order", [("accuracy", "sequential"), ("serving memory", "sequential"),
                                          ("speed", "sequential"), ("speed", "alternate")])
def test_a_variant_that_cannot_be_measured_is_listed_failed_and_the_others_go_on(stage, order, models, tmp_path,
                                                                                 monkeypatch, capsys):
    fakes = Fakes(monkeypatch)
    broken = {"accuracy": "measure_accuracy", "serving memory": "measure_serving_memory", "speed": "measure_speed"}[stage]
    works, together = getattr(fakes, broken), fakes.measure_speeds

    def measure(spec, *args, **kwargs):
        if os.path.basename(spec) == "small":
            raise SlimlmError(f"{spec}: the folder is broken.", "Export it again.")
        return works(spec, *args, **kwargs)

    def measure_together(specs, *args, **kwargs):  # loading every model first: one broken stops them all
        for spec in specs:
            if stage == "speed" and os.path.basename(spec) == "small":
                raise SlimlmError(f"{spec}: the folder is broken.", "Export it again.")
        return together(specs, *args, **kwargs)

    monkeypatch.setattr(compare, broken, measure)
    monkeypatch.setattr(compare, "measure_speeds", measure_together)
    out = tmp_path / "c"
    argv = [models["base"], models["small"], models["large"], "--out", out, *FAST, "--speed-order", order]
    assert compare.run_compare(parse(argv)) == 1
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base", "large"]
    assert report["failed"] == [{"label": "small", "spec": str(models["small"]), "stage": stage,
                                 "error": f"{models['small']}: the folder is broken.", "hint": "Export it again."}]
    assert "large" in report["pareto"]["points"] and "small" not in report["pareto"]["points"]
    md = (out / "report.md").read_text()
    assert "## Models that could not be measured" in md and f"small (`{models['small']}`), {stage}: " in md
    assert "small" in capsys.readouterr().err
    assert fakes.speed == ["base", "large"]  # alternated timing stopped at small: each timed alone
    # What small had measured before it failed is kept; the next run measures the rest.
    assert len(list((out / "cache").glob("*.json"))) == (2 if stage == "accuracy" else 3)

    # Mended, the next run measures only what small lacks, and its speed with the base's again.
    monkeypatch.setattr(compare, broken, works)
    monkeypatch.setattr(compare, "measure_speeds", together)
    assert compare.run_compare(parse(argv)) == 0
    assert fakes.accuracy == (["base", "large", "small"] if stage == "accuracy" else ["base", "small", "large"])
    assert fakes.speed == ["base", "large", "base", "small"]
    assert [m["label"] for m in json.loads((out / "report.json").read_text())["models"]] == ["base", "small", "large"]
    assert json.loads((out / "report.json").read_text())["failed"] == []


def test_the_base_failing_stops_the_comparison(models, tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)

    def measure(spec, settings):
        raise SlimlmError(f"{spec}: the folder is broken.")

    monkeypatch.setattr(compare, "measure_accuracy", measure)
    with pytest.raises(SlimlmError, match="broken"):
        compare.run_compare(parse([models["base"], models["small"], "--out", tmp_path / "c", *FAST]))
    assert fakes.speed == [] and fakes.memory == []


def test_pareto_front_on_hand_made_points():
    # (speedup, perplexity): higher speedup and lower perplexity are better.
    points = [(1.0, 6.8),   # 0 base
              (1.8, 7.9),   # 1 on the front
              (1.5, 8.2),   # 2 dominated by 1 (slower and worse)
              (2.5, 9.5),   # 3 the fastest
              (0.9, 7.0),   # 4 dominated by the base
              (2.5, 9.5),   # 5 equal to 3: equals do not dominate each other
              (3.0, float("nan"))]  # 6 unmeasured: never on the front
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([(1.0, 0.5), (2.0, 0.4), (1.5, 0.6)], maximize=(True, True)) == [2, 1]
    assert pareto_front([(1.0, 5.0)]) == [0]
    assert pareto_front([]) == []


@pytest.mark.parametrize("argv, words", [
    (["no-such-alias", "BASE"], "unknown model"),
    (["BASE", "/no/such/model"], "does not exist"),
    (["BASE", "SMALL", "--data", "builtin:nope"], "nope"),
    (["BASE", "SMALL", "--tasks", "/no/such/tasks.jsonl"], "does not exist"),
    (["BASE", "SMALL", "BASE"], "listed twice"),
    (["BASE", "SMALL", "--window", "1"], "--window"),
    (["BASE", "SMALL", "--reps", "0"], "--reps"),
    (["BASE", "SMALL", "--gen-len", "1"], "--gen-len out of range"),  # no decode tokens to time: a ZeroDivisionError
])
def test_bad_input_is_refused_before_any_work(argv, words, models, tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    out = tmp_path / "never"
    argv = [{"BASE": models["base"], "SMALL": models["small"]}.get(a, a) for a in argv]
    with pytest.raises(SlimlmError, match=words):
        compare.run_compare(parse([*argv, "--out", out]))
    assert fakes.accuracy == [] and fakes.speed == [] and not out.exists()


def test_an_out_folder_with_other_settings_needs_overwrite(models, tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    out = tmp_path / "c"
    assert compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST])) == 0
    with pytest.raises(SlimlmError, match="other settings.*window") as err:
        compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST, "--window", "16"]))
    assert "--overwrite" in str(err.value) and len(fakes.accuracy) == 2
    assert compare.run_compare(parse([models["base"], models["small"], "--out", out, *FAST, "--window", "16",
                                      "--overwrite"])) == 0
    assert fakes.accuracy == ["base", "small"] * 2  # everything measured again
    assert json.loads((out / "settings.json").read_text())["window"] == 16
    assert len(list((out / "cache").glob("*.json"))) == 2  # the old settings' cache is gone

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="not empty"):
        compare.run_compare(parse([models["base"], models["small"], "--out", foreign, *FAST]))


@pytest.mark.skipif("compare" not in VERBS, reason="`slimlm compare` is not wired into recipes/cli.py yet")
def test_the_cli_refuses_an_unknown_model_with_exit_2(models, capsys):
    assert main(["compare", str(models["base"]), "no-such-alias"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "Traceback" not in err


def test_speed_rounds_load_the_models_again_and_span_every_round(monkeypatch):
    # Each round loads every model afresh and runs its alternated repetitions; the figures and the raw values
    # cover all rounds, and a model measured alone keeps no raw values (its ratios divide medians).
    from slimlm.serve import bench

    loads, round_no = [], []

    def fake_interleaved(engines, concurrency, num_requests, prompt_len, gen_len, reps, progress=None,
                         make_prompts=None):
        round_no.append(len(round_no))
        k = float(len(round_no))  # round 1 gives 1, 2; round 2 gives 2, 4: the spread covers both
        return [{"values": {"batch1_tok_s": [k * (i + 1), 2 * k * (i + 1)], "batch1_decode_tok_s": [k, 3 * k],
                            "online_tok_s": [k, k],
                            "ttft_p50_ms": [k, k], "tpot_p50_ms": [k, k]},
                 "settings": {"reps": reps}} for i, _ in enumerate(engines)]

    monkeypatch.setattr(compare, "_engine", lambda spec, settings, plan=None: loads.append(spec) or spec)
    monkeypatch.setattr(bench, "benchmark_interleaved", fake_interleaved)
    settings = {"concurrency": 2, "num_requests": 2, "prompt_len": 8, "gen_len": 4, "reps": 2, "speed_rounds": 2}
    base, other = compare.measure_speeds(["base", "other"], settings)
    assert loads == ["base", "other", "base", "other"] and len(round_no) == 2
    assert base["values"]["batch1_tok_s"] == [1.0, 2.0, 2.0, 4.0]
    assert other["values"]["batch1_tok_s"] == [2.0, 4.0, 4.0, 8.0]
    assert base["figures"]["batch1_tok_s"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert base["figures"]["batch1_decode_tok_s"] == {"median": 2.5, "min": 1.0, "max": 6.0}
    assert base["bench_settings"]["speed_rounds"] == 2 and "tpot_p50_ms" in base["rows"]["engine online c=2"]
    alone = compare.measure_speed("base", settings)
    assert "values" not in alone and alone["figures"]["batch1_tok_s"]["max"] == 8.0 and len(loads) == 6


def test_speed_rounds_join_the_settings_only_when_not_one():
    assert "speed_rounds" not in compare.settings_from_args(parse(["a", "b", "--out", "x"]))
    assert compare.settings_from_args(parse(["a", "b", "--out", "x", "--speed-rounds", "3"]))["speed_rounds"] == 3
    with pytest.raises(SlimlmError, match="--speed-rounds"):
        compare.settings_from_args(parse(["a", "b", "--out", "x", "--speed-rounds", "0"]))


def test_spread_windows_join_the_settings_only_when_set_with_a_window_limit():
    assert "spread_windows" not in compare.settings_from_args(parse(["a", "b", "--out", "x"]))
    spread = compare.settings_from_args(parse(["a", "b", "--out", "x", "--max-windows", "8", "--spread-windows"]))
    assert spread["spread_windows"] is True and spread["max_windows"] == 8
    # All windows: nothing to spread, so the same settings (and cache) as without the flag.
    everything = compare.settings_from_args(parse(["a", "b", "--out", "x", "--max-windows", "0", "--spread-windows"]))
    assert "spread_windows" not in everything


@pytest.fixture(scope="module")
def exit_models(models, tmp_path_factory):
    """The 3-layer `large` folder as the base, an early-exit export of it (a lens exit after layer 1) and a plain
    export of it."""
    from slimlm.toolkit.early_exit import ExitHeads, write_with_exits
    from slimlm.toolkit.export import write

    root = tmp_path_factory.mktemp("exits")
    model, tok = tiny_model("llama", seed=2, num_hidden_layers=3)  # the weights of `large`: same seed, same weights
    write_with_exits(model, tok, ExitHeads.for_model(model, [1], "lens"), root / "lens-exits")
    write(model, tok, root / "plain-export")
    return {"base": models["large"], "lens-exits": root / "lens-exits", "plain-export": root / "plain-export"}


def fake_serving_memory(spec, settings, plan=None):
    mib = {"base": 4, "small": 1, "large": 8}.get(os.path.basename(spec), 2)
    return {"serving_bytes": mib * 2**20, "serving_peak_bytes": 2 * mib * 2**20, "kv_cache_bytes": 2**10, "exact": True}


def fixed_accuracy(spec, settings):
    return {"accuracy": {"perplexity": {"wiki": {"perplexity": 7.0}}, "tasks": {}}, "params": 1000,
            "memory": {"load_eval_bytes": 2**20}}


@pytest.fixture
def one_thread():
    """--threads 1 (5x faster here while other work shares the 2 cores); torch's count restored after."""
    import torch

    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_an_exit_export_is_timed_drafting_from_its_exit_unless_off(exit_models, text_file, tmp_path, monkeypatch,
                                                                     one_thread):
    """Speed measured for real (accuracy, untouched by speculation and measured for real above, faked: its
    subprocesses took 20 s): under the default --speculative auto the export drafts from its exit (alternated
    and sequential speed alike) and the report says what was accepted; --speculative off times it plainly."""
    monkeypatch.setattr(compare, "measure_accuracy", fixed_accuracy)
    monkeypatch.setattr(compare, "measure_serving_memory", fake_serving_memory)
    argv = [exit_models["base"], exit_models["lens-exits"], "--data", text_file, *FAST, "--gen-len", "12", *one_thread]
    out = tmp_path / "auto"
    assert compare.run_compare(parse([*argv, "--out", out])) == 0  # auto: tiny models are alternated
    report = json.loads((out / "report.json").read_text())
    base, exits = report["models"]
    assert "speculation" not in base["speed"] and base["speed"]["values"]  # alternated
    sp = exits["speed"]["speculation"]
    assert (sp["exit_layer"], sp["num_draft"], sp["norm"]) == (1, 4, "lens") and sp["drafted_tokens"] > 0
    assert 0 <= sp["acceptance_rate"] <= 1 and sp["mean_accepted_length"] >= 1
    md = (out / "report.md").read_text()
    assert "| lens-exits (self-spec) |" in md and "| large (base) |" in md
    note = next(line for line in md.splitlines() if line.startswith("- lens-exits: "))
    assert "self-speculative decoding from exit 1 (its own norm and lens)" in note
    assert f"{sp['acceptance_rate']:.0%} of {sp['drafted_tokens']} drafted tokens accepted" in note

    out = tmp_path / "sequential"
    assert compare.run_compare(parse([*argv, "--out", out, "--speed-order", "sequential"])) == 0
    exits = json.loads((out / "report.json").read_text())["models"][1]
    assert "values" not in exits["speed"] and 0 <= exits["speed"]["speculation"]["acceptance_rate"] <= 1

    out = tmp_path / "off"
    assert compare.run_compare(parse([*argv, "--out", out, "--speculative", "off"])) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["speculative"] == "off"
    assert not any("speculation" in m["speed"] or "speculation" in m["identity"] for m in report["models"])
    assert "self-spec" not in (out / "report.md").read_text()


def test_the_plan_joins_the_cache_key_of_an_exit_export_only(exit_models):
    """A plain figure of an exit export is never reused for a speculative one, nor the other way round; the keys
    of plain models are those they had before plans existed."""
    base, exits = compare.check_models([str(exit_models["base"]), str(exit_models["lens-exits"])])
    auto, off = {"reps": 1}, {"reps": 1, "speculative": "off"}
    plan = compare.speculation_plan(exits, auto)
    assert plan == {"exit_layer": 1, "num_draft": 4, "adaptive": True, "norm": "lens"}
    assert compare.speculation_plan(exits, off) is None

    def key(model, plan_settings):  # the same settings in the key: only the plan differs
        return compare.cache_key(compare.identity(model, compare.speculation_plan(model, plan_settings)), auto)

    assert key(exits, auto) != key(exits, off) == compare.cache_key(compare.identity(exits), auto)
    assert key(base, auto) == key(base, off) == compare.cache_key(compare.identity(base), auto)


def test_a_plain_folder_or_export_gets_no_plan(exit_models, models):
    plain = compare.check_models([str(models["base"]), str(exit_models["plain-export"])])
    assert [m["kind"] for m in plain] == ["hf_dir", "export"]
    assert [compare.speculation_plan(m, {}) for m in plain] == [None, None]


def test_a_speculation_note_says_what_was_used_and_achieved():
    sp = {"exit_layer": 4, "num_draft": 4, "adaptive": True, "norm": "own", "max_batch": 16, "drafted_tokens": 100,
          "steps": 40, "acceptance_rate": 0.23, "mean_accepted_length": 1.3}
    from slimlm.recipes.compare_report import speculation_note

    note = speculation_note("exits", sp, {"concurrency": 32})
    assert note.startswith("exits: speed with self-speculative decoding from exit 4 (its own norm), adaptive, "
                           "at most 4 drafts: 23% of 100 drafted tokens accepted, 1.30 tokens per speculative step")
    assert "batches of more than 16 decode plainly" in note
    assert "more than 16" not in speculation_note("exits", sp, {"concurrency": 8})
    assert "no token was drafted" in speculation_note("exits", {**sp, "acceptance_rate": None}, {"concurrency": 8})


def test_speed_prompts_join_the_settings_only_when_set_and_bad_files_are_refused_up_front(tmp_path):
    settings = lambda *argv: compare.settings_from_args(parse(["a", "b", "--out", "x", *argv]))  # noqa: E731
    plain = settings()
    assert "speed_task" not in plain and "speed_prompts_file" not in plain
    assert settings("--task", "quote")["speed_task"] == "quote"
    good = tmp_path / "p.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(4)))
    chosen = settings("--prompts-file", good, "--concurrency", "2")
    assert chosen["speed_prompts_file"] == str(good) and chosen["files_sha256"][str(good)] == compare.file_sha256(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"nope": 1}\n')
    for argv, words in [(["--prompts-file", good], "holds 4 prompts; this run needs 64"),
                        (["--prompts-file", bad, "--num-requests", "2"], "line 2"),
                        (["--prompts-file", tmp_path / "missing.jsonl"], "no such file"),
                        (["--prompts-file", good, "--task", "quote", "--num-requests", "2"], "both name")]:
        with pytest.raises(SlimlmError, match=words):
            settings(*argv)


def test_speculative_joins_the_settings_only_when_off():
    assert "speculative" not in compare.settings_from_args(parse(["a", "b", "--out", "x"]))
    assert compare.settings_from_args(parse(["a", "b", "--out", "x", "--speculative", "off"]))["speculative"] == "off"


def test_a_model_with_a_draft_is_timed_drafting_from_it(models, text_file, tmp_path, monkeypatch, one_thread):
    """`MODEL+draft:DRAFT` is MODEL's accuracy beside its speed with DRAFT as its draft model (the draft's step
    timed at a tenth of the model's, so the adaptive policy drafts from the start): the report names both,
    says what was accepted, and counts both folders on disk."""
    from slimlm.serve.engine import draft_speculative

    evaluated = []
    monkeypatch.setattr(compare, "measure_accuracy", lambda spec, s: evaluated.append(spec) or fixed_accuracy(spec, s))
    monkeypatch.setattr(draft_speculative, "decode_step_seconds", lambda models, block_size: [1.0, 0.1])
    served = []  # serving memory is measured with the plan: the draft model is loaded beside the model
    monkeypatch.setattr(compare, "measure_serving_memory",
                        lambda spec, s, plan=None: served.append((spec, plan)) or fake_serving_memory(spec, s, plan))
    drafted = f"{models['large']}{compare.DRAFT_SEP}{models['small']}"
    out = tmp_path / "draft"
    argv = [models["large"], drafted, drafted + compare.NGRAM_SUFFIX, "--data", text_file, *FAST, "--gen-len", "12",
            *one_thread, "--out", out]
    assert compare.run_compare(parse(argv)) == 0
    base, fast, both = json.loads((out / "report.json").read_text())["models"]
    assert fast["label"] == "large + draft small" and fast["spec"] == str(models["large"])
    assert evaluated == [str(models["large"])] and fast["accuracy_of"] == "large"  # the base's accuracy, not again
    assert fast["accuracy"] == base["accuracy"] and fast["params"] == base["params"]
    sp = fast["speed"]["speculation"]
    assert sp["draft_model"] == str(models["small"]) and sp["drafted_tokens"] > 0 and sp["num_draft"] == 4
    assert "speculation" not in base["speed"]
    assert fast["disk_bytes"] == base["disk_bytes"] + compare.disk_bytes({"spec": str(models["small"]), "kind": "hf_dir"})
    assert [spec for spec, _ in served] == [str(models["large"])] * 3
    assert served[0][1] is None and served[1][1]["draft_model"] == served[2][1]["draft_model"] == str(models["small"])
    md = (out / "report.md").read_text()
    assert "| large + draft small (draft-spec) |" in md
    assert f"speed with draft-model speculative decoding from {models['small']}, adaptive" in md
    # MODEL+draft:DRAFT+ngram: lookup first, the draft model where nothing matched (the engine's hybrid)
    assert both["label"] == "large + draft small + ngram" and both["accuracy_of"] == "large"
    sp = both["speed"]["speculation"]
    assert (sp["draft_model"], sp["prompt_lookup"]) == (str(models["small"]), 3) and sp["drafted_tokens"] > 0
    assert "| large + draft small + ngram (draft+ngram-spec) |" in md
    assert f"and draft-model speculative decoding from {models['small']} where nothing matched" in md


def test_draft_specs_are_checked_and_join_the_cache_key(models):
    large, small = str(models["large"]), str(models["small"])
    plain, drafted = compare.check_models([large, f"{large}+draft:{small}"])
    assert (drafted["draft"], drafted["draft_kind"]) == (small, "hf_dir")
    plan = compare.speculation_plan(drafted, {"speculative": "off"})  # asked for by name: off does not apply
    assert plan["draft_model"] == small and plan["draft_identity"] == compare.identity({"spec": small, "kind": "hf_dir"})
    assert compare.speculation_plan(plain, {}) is None
    key = lambda m: compare.cache_key(compare.identity(m, compare.speculation_plan(m, {})), {})  # noqa: E731
    assert key(plain) != key(drafted)
    _, both = compare.check_models([large, f"{large}+draft:{small}+ngram"])
    assert key(both) != key(drafted) and compare.speculation_plan(both, {})["prompt_lookup"] == compare.PROMPT_LOOKUP
    for specs, words in [([f"{large}+draft:{small}", small], "goes with a variant"),
                         ([small, f"{large}+draft:"], "goes with a variant"),
                         ([small, f"{large}+draft:{small}", f"{large}+draft:{small}"], "listed twice")]:
        with pytest.raises(SlimlmError, match=words):
            compare.check_models(specs)


@pytest.mark.parametrize("order", ["alternate", "sequential"])
def test_a_model_with_prompt_lookup_is_timed_drafting_from_its_text(models, text_file, tmp_path, monkeypatch,
                                                                     one_thread, order):
    """`MODEL+ngram`: MODEL's accuracy (taken from MODEL, listed before it) beside its speed with prompt-lookup
    drafts, on the user's prompts (--prompts-file; repetitive ones, so lookups find drafts); the report marks
    and explains it; its cache key differs from MODEL's; bad forms are refused."""
    evaluated = []
    monkeypatch.setattr(compare, "measure_accuracy", lambda spec, s: evaluated.append(spec) or fixed_accuracy(spec, s))
    monkeypatch.setattr(compare, "measure_serving_memory", fake_serving_memory)
    large = str(models["large"])
    out = tmp_path / "ngram"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{w} {w} {w} {w} {w} {w}"}) + "\n" for w in ("ab", "cd xy")))
    argv = [large, large + compare.NGRAM_SUFFIX, "--data", text_file, *FAST, "--gen-len", "24", *one_thread,
            "--out", out, "--prompts-file", prompts, "--speed-order", order]
    assert compare.run_compare(parse(argv)) == 0
    base, fast = json.loads((out / "report.json").read_text())["models"]
    assert fast["label"] == "large + ngram" and fast["spec"] == large and fast["accuracy_of"] == "large"
    assert evaluated == [large] and fast["accuracy"] == base["accuracy"]
    sp = fast["speed"]["speculation"]
    assert (sp["prompt_lookup"], sp["num_draft"], sp["adaptive"]) == (3, 4, True) and sp["drafted_tokens"] > 0
    md = (out / "report.md").read_text()
    assert "| large + ngram (ngram-spec) |" in md and "speed with prompt-lookup speculative decoding" in md
    assert f"the same prompts of {prompts} for every model" in md
    plain, looked_up = compare.check_models([large, large + compare.NGRAM_SUFFIX])
    key = lambda m: compare.cache_key(compare.identity(m, compare.speculation_plan(m, {})), {})  # noqa: E731
    assert key(plain) != key(looked_up)
    for specs in ([large + "+ngram", large], [large, "+ngram"]):
        with pytest.raises(SlimlmError, match="prompt lookup goes with a variant"):
            compare.check_models(specs)


def test_pareto_labels_do_not_overprint_each_other_or_other_points():
    # Four models side by side at one perplexity (the base, a lossless draft variant, int8...): labels written
    # to the right of each point would run over the next point and label; each gets a spot of its own.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimlm.recipes.compare_report import place_labels

    points = [(1.0, 6.72, "smollm2-135m"), (1.17, 6.72, "base-int4-draft"), (1.45, 6.71, "int8-rtn"),
              (1.78, 7.25, "int4-gptq"), (3.75, 25.8, "pruned-50-distilled-int4")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([x for x, _, _ in points], [y for _, y, _ in points])
    ax.set_yscale("log")
    ax.margins(0.15)
    fig.tight_layout()
    texts = place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    for t in texts:
        t.arrowprops = t.arrow_patch = None  # measure the text alone, not the leader line of a label set further off
    boxes = [t.get_window_extent(renderer) for t in texts]
    inside = ax.get_window_extent(renderer)
    assert [t.get_text() for t in texts] == [label for _, _, label in points]
    for i, a in enumerate(boxes):
        assert inside.x0 <= a.x0 and a.x1 <= inside.x1, points[i][2]  # the rightmost label turned left
        for j, b in enumerate(boxes[:i]):
            assert not a.overlaps(b), (points[i][2], points[j][2])
        for j, (x, y, _) in enumerate(points):
            mx, my = ax.transData.transform((x, y))
            assert j == i or not (a.x0 < mx < a.x1 and a.y0 < my < a.y1), (points[i][2], points[j][2])
    plt.close(fig)
