"""lm-evaluation-harness's `local-completions` model against a live slimlm server.

lm-eval scores a log-likelihood multiple-choice task by sending each (context, choice) as token ids
with `echo: true, logprobs: 1, max_tokens: 1` and summing the prompt logprobs after the context. The
task here is defined locally (YAML + jsonl in tmp_path, no hub), and its result is checked against
slimlm's own `toolkit.eval.multiple_choice` on the same rows, which scores the same way:
- `acc` (argmax of summed log-likelihood, first index on ties) must be equal;
- slimlm's `acc_norm` divides by the choice's UTF-8 bytes, which is lm-eval's `acc_bytes` (lm-eval's own
  `acc_norm` divides by characters; a non-ASCII row below makes the two differ in principle);
- and, stronger than a 10-row accuracy, every per-choice log-likelihood lm-eval logged must equal the one
  slimlm computes with HF's forward pass (the server runs its own model code; fp32, so ~1e-5 apart).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval-harness is not installed (pip install 'lm_eval[api]'; ~350 MB with scipy and "
                      "scikit-learn, so it is not in the dev extra)")

from slimlm.toolkit.eval import loglikelihood, multiple_choice  # noqa: E402
from slimlm.toolkit.models import tiny_model  # noqa: E402

TASK = "slimlm_interop_mc"

# Contexts with and without trailing whitespace (lm-eval and slimlm both move it into the choice),
# 2 to 4 choices of different lengths, one non-ASCII choice (bytes != characters).
ROWS = [
    {"context": "Question: Is the sky blue? Answer:", "choices": [" yes", " no"], "label": 0},
    {"context": "The capital of France is ", "choices": ["Paris", "Rome", "Berlin"], "label": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5", " 22", " four"], "label": 0},
    {"context": "Water boils at", "choices": [" 100 degrees", " 10 degrees"], "label": 0},
    {"context": "The opposite of hot is", "choices": [" cold", " warm", " hotter"], "label": 0},
    {"context": "A cat says", "choices": [" meow", " woof", " moo"], "label": 0},
    {"context": "Coffee in French:", "choices": [" café", " cafe", " tea"], "label": 0},
    {"context": "Once upon a", "choices": [" time", " mattress"], "label": 0},
    {"context": "abc", "choices": ["d", "x", "defghij"], "label": 0},
    {"context": "The quick brown fox jumps over the lazy", "choices": [" dog", " cat"], "label": 1},
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def model_and_server(interop):
    from slimlm.serve.api import create_app

    hf, tok = tiny_model("llama")
    engine = interop.tiny_engine(hf, tok, max_model_len=256, num_blocks=128)
    with interop.LiveServer(create_app(engine)) as server:
        yield hf, tok, server


@pytest.mark.timeout(240)
def test_lm_eval_local_completions_matches_slimlm_eval(model_and_server, interop, tmp_path):
    hf, tok, server = model_and_server
    model_dir = tmp_path / "tiny-llama"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    out_dir = tmp_path / "out"

    model_args = ",".join([
        f"model={interop.MODEL_NAME}", f"base_url={server.url}/v1/completions",
        f"tokenizer={model_dir}", "tokenizer_backend=huggingface", "num_concurrent=1", "max_retries=1",
        "timeout=60",
    ])
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out_dir),
           "--log_samples", "--seed", "1234"]
    home = tmp_path / "hf_home"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "unused"}
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=200)
    took = time.monotonic() - started
    assert proc.returncode == 0, f"lm_eval failed ({proc.returncode}) after {took:.1f}s:\n{proc.stderr[-6000:]}"

    results_files = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    samples_files = glob.glob(str(out_dir / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    assert len(results_files) == 1 and len(samples_files) == 1, (results_files, samples_files)
    results = json.loads(Path(results_files[0]).read_text())["results"][TASK]
    samples = [json.loads(line) for line in Path(samples_files[0]).read_text().splitlines() if line.strip()]

    ours = multiple_choice(hf, tok, ROWS, progress=False)
    assert results["acc,none"] == pytest.approx(ours["acc"], abs=1e-9), (results, ours)
    assert results["acc_bytes,none"] == pytest.approx(ours["acc_norm"], abs=1e-9), (results, ours)
    assert "acc_norm,none" in results

    # Per choice: lm-eval's summed log-likelihood (from the server's echoed prompt logprobs) equals slimlm's.
    assert sorted(s["doc_id"] for s in samples) == list(range(len(ROWS)))
    for sample in samples:
        row = ROWS[sample["doc_id"]]
        assert sample["doc"]["choices"] == row["choices"]
        served = [float(resp[0]) for resp in sample["filtered_resps"]]
        expected = loglikelihood(hf, tok, [(row["context"], c) for c in row["choices"]])
        assert served == pytest.approx(expected, abs=1e-4), (row, served, expected)
        assert all(v < 0 for v in served)
