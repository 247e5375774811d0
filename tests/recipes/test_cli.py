"""The `slimlm` command: verbs, help, eval/export on a tiny model, and user errors (exit 2, no traceback)."""
import json
import subprocess
import sys

import pytest
import torch

from slimlm.recipes.cli import VERBS, main
from slimlm.toolkit.models import tiny_model

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    model, tok = tiny_model("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "held_out.txt"
    f.write_text(TEXT)
    return f


def test_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "slimlm.recipes.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: slimlm " + verb in capsys.readouterr().out


def test_eval_prints_perplexity_and_writes_json(model_dir, text_file, tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"context": "The fox", "choices": [" jumps", " sleeps"], "label": 0}) + "\n"
                     + json.dumps({"context": "The dog", "choices": [" is lazy", " flies"], "label": 0}) + "\n")
    out_json = tmp_path / "r" / "eval.json"
    code = main(["eval", str(model_dir), "--data", str(text_file), "--tasks", str(tasks), "--window", "64",
                 "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "held_out.txt" in line and "perplexity" in line)
    results = json.loads(out_json.read_text())
    ppl = results["perplexity"]["held_out.txt"]["perplexity"]
    assert f"{ppl:.2f}" in row
    assert 1.0 < ppl < 400  # a random model over ~259 byte tokens is near-uniform
    assert results["tasks"]["t.jsonl"]["n"] == 2
    assert results["settings"]["window"] == 64
    assert results["command"].startswith("slimlm eval ")


def test_export_then_eval_the_export(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(model_dir), "--out", str(out)]) == 0
    assert (out / "slimlm.json").exists()
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["command"].startswith("slimlm export")
    assert main(["eval", str(out), "--data", str(text_file), "--window", "64", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_quantizing_a_pruned_export_keeps_its_pruned_shapes(model_dir, tmp_path):
    """quantize, qat and early-exit wrote a manifest without the pruned shapes of the export they started from."""
    from slimlm.toolkit.export import kept_transforms, read, write
    from slimlm.toolkit.models import load

    shapes = {"layers": [{"heads": 2, "intermediate": 32}], "axes": ["mlp"]}
    model, tok = load(str(model_dir))
    pruned = write(model, tok, tmp_path / "pruned", meta={"transforms": {"pruned_shapes": shapes}})
    assert kept_transforms(pruned) == {"pruned_shapes": shapes} and kept_transforms(model_dir) == {}
    assert main(["quantize", str(pruned), "--method", "rtn", "--bits", "8", "--group-size", "-1", "--no-eval",
                 "--out", str(tmp_path / "q")]) == 0
    manifest = read(tmp_path / "q")
    assert manifest.transforms["pruned_shapes"] == shapes and manifest.transforms["quant"]["method"] == "rtn"
    assert main(["export", str(pruned), "--out", str(tmp_path / "again")]) == 0  # exporting it again: kept too
    assert read(tmp_path / "again").transforms["pruned_shapes"] == shapes


def test_export_refuses_a_non_empty_out(model_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("argv, words", [
    (["eval", "/no/such/model"], "does not exist"),
    (["eval", "no-such-alias"], "unknown model"),
    (["eval", "MODEL", "--data", "builtin:nope"], "nope"),
    (["eval", "MODEL", "--data", "/no/such/file.txt"], "does not exist"),
    (["eval", "MODEL", "--window", "1"], "--window"),
    (["eval", "MODEL", "--max-windows", "-1"], "--max-windows >= 0 (0: all)"),
    (["eval", "PARENT"], "Did you mean"),  # a run's folder, its model in a subfolder
])
def test_user_errors_exit_2_with_a_short_message(argv, words, model_dir, capsys):
    argv = [str(model_dir) if a == "MODEL" else str(model_dir.parent) if a == "PARENT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


@pytest.mark.parametrize("argv", [["--debug", "eval", "/no/such/model"], ["eval", "/no/such/model", "--debug"]])
def test_debug_shows_the_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "slimlm.recipes.cli", *argv], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_is_installed():
    exe = __import__("shutil").which("slimlm", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the slimlm console script is not installed next to this python"
    proc = subprocess.run([exe, "eval", "/no/such/model"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_bench_runs_with_a_baseline_and_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--baseline", "hf", "--batch-sizes", "1", "--concurrency", "2",
                 "--num-requests", "2", "--prompt-len", "8", "--gen-len", "3", "--reps", "1", "--dtype", "float32",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "engine batch 1 / hf batch 1" in printed
    result = json.loads(out.read_text())
    assert result["rows"]["engine batch 1"]["tokens_per_s"]["median"] > 0
    assert result["command"].startswith("slimlm bench")


def test_bench_with_an_int8_kv_cache(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batch-sizes", "2", "--concurrency", "0", "--prompt-len", "8",
                 "--gen-len", "3", "--reps", "1", "--dtype", "float32", "--kv-cache-dtype", "int8", "--json", str(out)])
    assert code == 0
    assert "KV cache int8" in " ".join(capsys.readouterr().out.split())  # the title may wrap
    assert json.loads(out.read_text())["kv_cache_dtype"] == "int8"


def test_bench_refuses_bad_batch_sizes(model_dir, capsys):
    assert main(["bench", str(model_dir), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_serve_answers_an_openai_client(model_dir):
    """`slimlm serve` as a user runs it: a subprocess on a free loopback port, queried with openai."""
    import socket
    import time

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = __import__("pathlib").Path(sys.executable).parent / "slimlm"
    proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--port", str(port), "--served-model-name", "tiny",
                             "--dtype", "float32", "--max-model-len", "256", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "server did not start within 60 s"
                time.sleep(0.5)
        assert [m.id for m in models.data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_bad_port(model_dir, capsys):
    assert main(["serve", str(model_dir), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def test_serve_refuses_a_max_model_len_beyond_the_models_context(model_dir, capsys):
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    assert main(["serve", str(model_dir), "--max-model-len", str(context + 1)]) == 2
    err = capsys.readouterr().err
    assert f"max_model_len {context + 1} is past this model's context of {context} tokens" in err
    assert "Pass a smaller --max-model-len" in err and "internal error" not in err


def test_bench_speculative_reports_plain_and_speculative_side_by_side(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batch-sizes", "1", "--concurrency", "0", "--prompt-len", "8",
                 "--gen-len", "6", "--reps", "1", "--dtype", "float32", "--speculative", "self", "--exit-layer", "1",
                 "--num-draft", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"engine batch 1", "spec batch 1"} <= set(result["rows"])
    assert result["ratios"]["spec batch 1 / engine batch 1"] > 0
    assert result["ratios"]["spec batch 1 / engine batch 1, decode"] > 0
    assert 0 <= result["speculative"]["spec_acceptance_rate"] <= 1
    assert "draft tokens accepted" in capsys.readouterr().out


def test_bench_speculative_with_a_draft_model(model_dir, tmp_path):
    # The model as its own draft: the flags reach the engine (a draft as large as the target never pays,
    # so the adaptive policy may not draft at all: the engine tests check what drafting computes).
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batch-sizes", "1", "--concurrency", "0", "--prompt-len", "8",
                 "--gen-len", "6", "--reps", "1", "--dtype", "float32", "--speculative", "draft", "--draft-model",
                 str(model_dir), "--num-draft", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert 0 <= result["speculative"]["spec_acceptance_rate"] <= 1
    assert result["ratios"]["spec batch 1 / engine batch 1"] > 0


def test_bench_ngram_on_quote_prompts(model_dir, tmp_path, capsys):
    # Prompt lookup on the copying task: the flags reach the engine, drafts are found and verified.
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batch-sizes", "1", "--concurrency", "0", "--task", "quote",
                 "--gen-len", "12", "--reps", "1", "--dtype", "float32", "--speculative", "ngram", "--num-draft", "3",
                 "--prompt-lookup-min", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["speculative"]["spec_draft_tokens_total"] > 0
    assert result["ratios"]["spec batch 1 / engine batch 1"] > 0
    assert "quote prompts" in capsys.readouterr().out


def test_bench_draft_model_with_prompt_lookup(model_dir, tmp_path):
    # --speculative draft --prompt-lookup N: lookup first, the draft model elsewhere (fixed drafting is
    # not a CLI option, so the adaptive policy decides; on quote prompts lookup drafts are found and pay).
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batch-sizes", "1", "--concurrency", "0", "--task", "quote",
                 "--gen-len", "12", "--reps", "1", "--dtype", "float32", "--speculative", "draft", "--draft-model",
                 str(model_dir), "--prompt-lookup", "3", "--prompt-lookup-min", "1", "--num-draft", "3",
                 "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["ratios"]["spec batch 1 / engine batch 1"] > 0
    assert 0 <= result["speculative"]["spec_acceptance_rate"] <= 1


def test_bench_on_a_prompts_file_and_its_errors(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"request {i}: say something"}) for i in range(3)) + "\n")
    out = tmp_path / "bench.json"
    base = ["bench", str(model_dir), "--batch-sizes", "1,2", "--concurrency", "0", "--gen-len", "4", "--reps", "1",
            "--dtype", "float32"]
    assert main([*base, "--prompts-file", str(prompts), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "engine batch 2" in result["rows"]
    # the settings say what the run used: the file, not the unused --prompt-len; no online requests
    assert result["settings"]["prompts_file"] == str(prompts) and "prompt_len" not in result["settings"]
    assert result["settings"]["num_requests"] is None
    assert f"promptsof{prompts}" in "".join(capsys.readouterr().out.split())  # the title names the file
    assert main([*base, "--batch-sizes", "4", "--prompts-file", str(prompts)]) == 2
    assert "holds 3 prompts; this run needs 4" in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    assert main([*base, "--prompts-file", str(prompts)]) == 2
    assert "line 2" in capsys.readouterr().err
    for row, words in (({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not prompt and messages"),
                       ({"messages": [{"foo": "bar"}]}, "message 0 must be an object with a string \"role\"")):
        prompts.write_text('{"prompt": "ok"}\n' + json.dumps(row) + "\n")  # each was timed as something else
        assert main([*base, "--prompts-file", str(prompts)]) == 2
        assert words in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--prompts-file", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--prompts-file", str(prompts), "--task", "quote"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    prompts.write_text('{"prompt": "ok"}\n' + json.dumps({"prompt_token_ids": [5] * 1022}) + "\n")
    assert main([*base, "--prompts-file", str(prompts)]) == 2  # 1022 + 4 past the 1,024 positions: timed short
    assert f"the prompt at line 2 of {prompts} has 1022 tokens; with --gen-len 4" in " ".join(capsys.readouterr().err.split())


def test_bench_sizes_the_engine_for_a_rate_run_and_refuses_nothing_to_measure(model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import slimlm.serve.bench as bench
    from slimlm.serve.engine import engine as engine_module

    seen, real_init = [], engine_module.LLMEngine.__init__

    def spy(self, model, tok, config=None, **kw):
        seen.append(config.max_num_seqs)
        real_init(self, model, tok, config, **kw)

    monkeypatch.setattr(engine_module.LLMEngine, "__init__", spy)
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: {"rows": {}, "ratios": {}, "settings": {}})
    base = ["bench", str(model_dir), "--batch-sizes", "1", "--reps", "1", "--gen-len", "4", "--prompt-len", "8"]
    assert main([*base, "--concurrency", "0", "--rate", "100", "--num-requests", "12"]) == 0
    assert seen == [12]  # every Poisson arrival may be in flight; was 1 (the batch sizes'), queueing the others
    assert main([*base, "--concurrency", "3", "--rate", "100"]) == 0 and seen[-1] == 3  # capped where asked
    assert main([*base, "--concurrency", "0", "--rate", "100", "--num-requests", "3000"]) == 0  # one token each a step
    assert seen[-1] == 2048
    capsys.readouterr()
    assert main(["bench", str(model_dir), "--batch-sizes", ",", "--concurrency", "0"]) == 2
    assert "nothing to measure" in capsys.readouterr().err


def test_bench_refuses_a_model_type_the_engine_does_not_serve(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_model("llama")
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    assert main(["bench", str(path), "--batch-sizes", "1", "--concurrency", "0", "--reps", "1", "--gen-len", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot benchmark" in err and "gpt2" in err and "internal error" not in err


@pytest.mark.parametrize("argv, words", [(["--speculative", "self", "--exit-layer", "9"], "--exit-layer must be in 1.."),
                                         (["--exit-layer", "1"], "needs --speculative"),
                                         (["--speculative", "draft"], "go together"),
                                         (["--draft-model", "x"], "go together"),
                                         (["--speculative", "draft", "--draft-model", "x", "--exit-layer", "1"],
                                          "needs --speculative self"),
                                         (["--draft-head", "int4"], "--draft-head needs --speculative self"),
                                         (["--speculative", "draft", "--draft-model", "x", "--draft-head", "int8"],
                                          "--draft-head needs --speculative self"),
                                         (["--speculative", "self", "--exit-layer", "1", "--prompt-lookup", "3"],
                                          "--prompt-lookup needs --speculative ngram"),
                                         (["--speculative", "draft", "--draft-model", "x", "--prompt-lookup", "3",
                                           "--exit-confidence", "0.9"], "prompt-lookup drafts have none")])
def test_bench_refuses_bad_speculative_flags(model_dir, capsys, argv, words):
    assert main(["bench", str(model_dir), "--batch-sizes", "1", "--reps", "1", *argv]) == 2
    assert words in capsys.readouterr().err


def test_eval_reports_exits_of_an_early_exit_export(tmp_path, text_file, capsys):
    from slimlm.toolkit.early_exit import ExitHeads, write_with_exits

    model, tok = tiny_model("llama", num_hidden_layers=3)
    out = write_with_exits(model, tok, ExitHeads.for_model(model, [1, 2], "own"), tmp_path / "ee")
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(text_file), "--window", "32", "--max-windows", "2",
                 "--json", str(out_json)]) == 0
    assert "agreement" in capsys.readouterr().out
    result = json.loads(out_json.read_text())["early_exit"]
    assert set(result["exits"]) == {"1", "2"} and result["norm"] == "own"
    assert all(0 <= r["agreement"] <= 1 and r["perplexity"] > 1 for r in result["exits"].values())
    # the same model with --exits reads the shared norm; a layer past the model is refused
    assert main(["eval", str(out), "--data", str(text_file), "--window", "32", "--max-windows", "1",
                 "--exits", "3", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["early_exit"]["norm"] == "shared"
    assert "not this export's trained exits (own norm, layers 1,2)" in capsys.readouterr().err  # said, not silent
    assert main(["eval", str(out), "--data", str(text_file), "--exits", "4"]) == 2
    assert "layers must be in 1..3" in capsys.readouterr().err
    # --spread-windows picks the same windows for the model's perplexity and its exits' (a source given twice is
    # evaluated once)
    assert main(["eval", str(out), "--data", str(text_file), "--data", str(text_file), "--window", "16",
                 "--max-windows", "3", "--spread-windows", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["data"] == [str(text_file)] and result["settings"]["spread_windows"] is True
    plain = result["perplexity"]["held_out.txt"]
    assert plain["spread"] is True and plain["windows"] == 3
    assert result["early_exit"]["final"]["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)
    # re-exporting it would drop its exits: refused
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already a slimlm export with early exits" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_verbs_take_each_others_names_for_the_same_setting():
    from slimlm.recipes.cli import build_parser

    parse = build_parser().parse_args
    q = parse(["quantize", "m", "--out", "x", "--calib-samples", "8", "--calib-len", "64"])
    assert (q.samples, q.seq_len) == (8, 64)
    p = parse(["prune", "m", "--out", "x", "--target-params", "1M", "--samples", "8", "--seq-len", "64"])
    assert (p.calib_samples, p.calib_len) == (8, 64)
    e = parse(["eval", "m", "--eval-batch-size", "2", "--threads", "1"])
    assert (e.batch_size, e.threads) == (2, 1)


@pytest.mark.parametrize("verb", ["distill", "qat", "early-exit"])
def test_training_overrides_may_follow_resume(verb, capsys):
    """`slimlm distill --config C a=1 --resume b=2` keeps both overrides, in order, as `python recipes/X.py` does;
    an unknown flag is still refused by argparse."""
    from slimlm.recipes.cli import parse_arguments

    args = parse_arguments([verb, "--config", "c.yaml", "max_steps=4", "--resume", "lr=0.1", "seed=3"])
    assert args.resume and args.overrides == ["max_steps=4", "lr=0.1", "seed=3"]
    with pytest.raises(SystemExit) as stop:
        parse_arguments([verb, "--config", "c.yaml", "--resume", "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"slimlm {verb}: error: unrecognized arguments: --bogus" in err  # the verb's
    assert f"usage: slimlm {verb}" in err                                                              # own usage
    with pytest.raises(SystemExit):
        parse_arguments(["eval", "m", "max_steps=4"])  # only the training recipes take overrides


def test_bad_values_are_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    """Values a long run would only trip over at its end (or crash on) are refused before it starts."""
    from slimlm.toolkit import eval as eval_mod

    monkeypatch.setattr(eval_mod, "evaluate", lambda *a, **k: pytest.fail("work started"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    bench = ["bench", str(model_dir), "--batch-sizes", "1", "--reps", "1"]
    for argv, words in [([*bench, "--concurrency", "-1"], "--concurrency must be >= 0"),
                        ([*bench, "--num-requests", "0"], "--num-requests >= 1"),
                        ([*bench, "--rate", "-1"], "--rate > 0"),
                        ([*bench, "--threads", "-2"], "--threads must be at least 1"),
                        ([*bench, "--json", str(blocker / "x.json")], f"{blocker} is a file"),
                        ([*bench, "--json", str(tmp_path)], "is a folder"),
                        (["eval", str(model_dir), "--json", str(blocker / "x.json")], f"{blocker} is a file"),
                        (["eval", str(model_dir), "--exits", "99"], "layers must be in 1.."),
                        (["eval", str(model_dir), "--threads", "0"], "--threads must be at least 1"),
                        (["eval", str(model_dir), "--threads", "-1"], "--threads must be at least 1"),
                        (["eval", str(model_dir), "--tasks", str(tmp_path), "--exits", "1"], "no --data"),
                        (["eval", str(model_dir), "--spread-windows"], "--max-windows is not set"),
                        (["quantize", str(model_dir), "--method", "rtn", "--out", str(tmp_path / "q"),
                          "--threads", "-2"], "--threads must be at least 1"),
                        (["export", str(model_dir), "--out", str(blocker)], "is a file; an export needs a folder"),
                        # found after pruning (FileExistsError), or at the write (NotADirectoryError)
                        (["prune", str(model_dir), "--target-params", "0.5", "--out", str(blocker / "sub")],
                         "afile is a file, so an export cannot be made under it"),
                        (["quantize", str(model_dir), "--method", "rtn", "--out", str(blocker / "a" / "b")],
                         "afile is a file, so an export cannot be made under it"),
                        *([(["export", str(model_dir), "--out", "/proc/slimlm-test/x"], "folders cannot be made in /proc")]
                          if __import__("os").path.isdir("/proc/self") else []),
                        (["quantize", str(model_dir), "--method", "rtn", "--out", str(blocker)], "afile is a file"),
                        (["prune", str(model_dir), "--target-params", "0.5", "--out", str(blocker)], "afile is a file"),
                        (["prune", str(model_dir), "--target-params", "1.5", "--out", str(tmp_path / "p")],
                         "neither a fraction (below 1) nor a whole count"),
                        (["prune", str(model_dir), "--target-params", "0.5", "--out", str(tmp_path / "p"),
                          "--threads", "0"], "threads must be at least 1"),
                        # both found only after the model loaded (one ran at 20,000 tokens for minutes)
                        (["prune", str(model_dir), "--target-params", "0.5", "--out", str(tmp_path / "p"),
                          "--calib-len", "4096"], "--calib-len 4096 is longer than"),
                        (["prune", str(model_dir), "--target-params", "0.5", "--out", str(tmp_path / "p"),
                          "--calib-len", "1"], "calib-len must be at least 2"),
                        ([*bench, "--prompt-len", "100000"], "is more than this model's context"),
                        (["eval", str(model_dir), "--device", "nodevice"], "is not a device torch knows"),
                        *([(["eval", str(model_dir), "--device", "cuda"], "no CUDA")]
                          if not torch.cuda.is_available() else [])]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "internal error" not in err, (argv, err)


def test_bench_speculative_drafts_through_an_exports_own_exit_norm(tmp_path):
    from slimlm.recipes.cli import build_parser, speculative_config
    from slimlm.toolkit.early_exit import ExitHeads, write_with_exits

    model, tok = tiny_model("llama", num_hidden_layers=3)
    heads = ExitHeads.for_model(model, [2], "own")
    with torch.no_grad():
        for p in heads.parameters():
            p.fill_(0.5)
    out = write_with_exits(model, tok, heads, tmp_path / "ee")
    args = build_parser().parse_args(["bench", str(out), "--speculative", "self"])
    spec = speculative_config(args, 3)
    assert spec.exit_layer == 2 and torch.equal(spec.exit_norm, torch.full((model.config.hidden_size,), 0.5))


def test_bench_speculative_drafts_through_an_exports_lens(tmp_path):
    from slimlm.recipes.cli import build_parser, speculative_config
    from slimlm.toolkit.early_exit import ExitHeads, write_with_exits

    model, tok = tiny_model("llama", num_hidden_layers=3)
    heads = ExitHeads.for_model(model, [1, 2], "lens")
    with torch.no_grad():
        for i, p in enumerate(heads.parameters()):
            p.fill_(0.1 * (i + 1))
    out = write_with_exits(model, tok, heads, tmp_path / "ee")
    args = build_parser().parse_args(["bench", str(out), "--speculative", "self", "--exit-layer", "2"])
    spec = speculative_config(args, 3)
    lens = heads.exits["2"]
    assert spec.exit_layer == 2 and torch.equal(spec.exit_norm, lens.norm.weight)
    assert torch.equal(spec.exit_proj[0], lens.proj.weight) and torch.equal(spec.exit_proj[1], lens.proj.bias)


def test_exit_confidence_flag_is_lossy_opt_in_and_checked():
    from slimlm.recipes.cli import build_parser, speculative_config
    from slimlm.toolkit.errors import SlimlmError

    parse = build_parser().parse_args
    assert speculative_config(parse(["bench", "smollm2-135m", "--speculative", "self", "--exit-layer", "1"]), 3).exit_confidence is None
    spec = speculative_config(parse(["bench", "smollm2-135m", "--speculative", "self", "--exit-layer", "1", "--exit-confidence", "0.8"]), 3)
    assert spec.exit_confidence == 0.8 and spec.draft_head is None
    spec = speculative_config(parse(["bench", "smollm2-135m", "--speculative", "self", "--exit-layer", "1", "--draft-head", "int4"]), 3)
    assert spec.draft_head == "int4"
    for bad in (["--exit-confidence", "0.8"], ["--speculative", "self", "--exit-layer", "1", "--exit-confidence", "1.5"]):
        with pytest.raises(SlimlmError, match="exit-confidence"):
            speculative_config(parse(["bench", "smollm2-135m", *bad]), 3)


def test_an_exit_too_deep_to_ever_pay_is_said_at_start(capsys):
    """The adaptive policy never drafts where even always-right drafts would not pay: a server that then decodes
    plainly says so, rather than behaving as a plain one without a word."""
    from slimlm.recipes.cli import build_parser, speculative_config

    parse = build_parser().parse_args
    speculative_config(parse(["bench", "smollm2-135m", "--speculative", "self", "--exit-layer", "28"]), 30)
    assert "--exit-layer 28 of 30 layers: even drafts that are always right" in capsys.readouterr().err
    speculative_config(parse(["bench", "smollm2-135m", "--speculative", "self", "--exit-layer", "8"]), 30)
    assert "always right" not in capsys.readouterr().err


def test_speculative_ngram_flags_make_a_prompt_lookup_config_and_bad_ones_are_refused():
    from slimlm.recipes.cli import build_parser, speculative_config
    from slimlm.toolkit.errors import SlimlmError

    parse = build_parser().parse_args
    spec = speculative_config(parse(["serve", "smollm2-135m", "--speculative", "ngram", "--num-draft", "6"]), 3)
    assert (spec.prompt_lookup, spec.prompt_lookup_min, spec.num_draft, spec.draft_model) == (3, 2, 6, None)
    spec = speculative_config(parse(["bench", "smollm2-135m", "--speculative", "ngram", "--prompt-lookup", "5",
                                     "--prompt-lookup-min", "1"]), 3)
    assert (spec.prompt_lookup, spec.prompt_lookup_min) == (5, 1)
    for bad, match in ((["--prompt-lookup", "1"], "prompt-lookup"), (["--exit-confidence", "0.9"], "exit-confidence"),
                       (["--exit-layer", "1"], "exit-layer")):
        with pytest.raises(SlimlmError, match=match):
            speculative_config(parse(["bench", "smollm2-135m", "--speculative", "ngram", *bad]), 3)


def _anon_huge_kb(thp_env: str | None) -> tuple[str, int]:
    """A fresh interpreter imports the CLI, then torch allocates and touches 64 MB: (the variable, its huge-page kB)."""
    import os
    code = ("import os, slimlm.recipes.cli, torch\n"
            "x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)\n"
            "kb = [line.split()[1] for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHugePages')][0]\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], kb)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if thp_env is not None:
        env["THP_MEM_ALLOC_ENABLE"] = thp_env
    value, kb = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.split()
    return value, int(kb)


def test_cli_puts_large_torch_buffers_in_huge_pages_unless_told_not_to():
    from pathlib import Path
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (setting.exists() and Path("/proc/self/smaps_rollup").exists()) or "[never]" in setting.read_text():
        pytest.skip("no transparent huge pages on this machine (Linux with THP not set to never)")
    value, kb = _anon_huge_kb(None)
    assert value == "1" and kb >= 32 * 1024  # most of the 64 MB buffer in 2 MB pages
    value, kb = _anon_huge_kb("0")
    assert value == "0"
    if "[madvise]" in setting.read_text():  # (with [always] the kernel uses huge pages regardless)
        assert kb == 0


def test_speculation_with_an_int8_kv_cache_is_said_to_be_lossy(model_dir, capsys):
    from slimlm.recipes.cli import build_parser, speculative_config

    for verb in ("bench", "serve"):
        speculative_config(build_parser().parse_args([verb, str(model_dir), "--speculative", "ngram"]), 2)
        assert "not lossless" not in capsys.readouterr().err
        speculative_config(build_parser().parse_args([verb, str(model_dir), "--speculative", "ngram",
                                                      "--kv-cache-dtype", "int8"]), 2)
        assert "with --kv-cache-dtype int8, speculative decoding is not lossless" in capsys.readouterr().err
