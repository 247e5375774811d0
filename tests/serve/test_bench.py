"""The benchmark harness on a tiny model: every figure is produced, and the counts add up."""
import pytest

from slimlm.serve.bench import benchmark, bench_prompts, file_prompts, percentile, run_engine, task_prompts
from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.toolkit.models import tiny_model


@pytest.fixture(scope="module")
def engine_and_model():
    model, tok = tiny_model("llama")
    return LLMEngine(model, tok, EngineConfig(block_size=4)), model


def test_prompts_are_distinct_held_out_windows_of_exact_length(engine_and_model):
    engine, _ = engine_and_model
    prompts = bench_prompts(engine.tokenizer, 6, 20)
    assert all(len(p) == 20 for p in prompts) and len({tuple(p) for p in prompts}) == 6
    assert bench_prompts(engine.tokenizer, 6, 20) == prompts  # seeded


def test_task_prompts_are_chat_prompts_around_distinct_held_out_paragraphs(engine_and_model):
    tok = engine_and_model[0].tokenizer
    prompts = task_prompts(tok, 5, "quote")
    texts = [tok.decode(p) for p in prompts]
    assert len({tuple(p) for p in prompts}) == 5 and task_prompts(tok, 5, "quote") == prompts  # distinct, seeded
    assert all("Repeat the following text word for word." in t and "<doc" not in t for t in texts)
    assert all(len(t.split("word for word.")[1].split()) >= 40 for t in texts)  # a paragraph of prose follows
    assert "Summarize" in tok.decode(task_prompts(tok, 1, "summarize")[0])
    with pytest.raises(ValueError, match="task must be one of"):
        task_prompts(tok, 1, "translate")


def test_file_prompts_read_text_chats_and_ids_and_name_the_bad_line(engine_and_model, tmp_path):
    import json

    tok = engine_and_model[0].tokenizer
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "hello there"}, {"messages": [{"role": "user", "content": "hi"}]},
            {"prompt_token_ids": [5, 6, 7]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = file_prompts(tok, str(path), 3)
    assert got[0] == tok("hello there", add_special_tokens=False)["input_ids"] and got[2] == [5, 6, 7]
    assert "hi" in tok.decode(got[1]) and len(got[1]) > len(tok("hi")["input_ids"])  # the chat template's tokens
    assert file_prompts(tok, str(path), 2) == got[:2]
    with pytest.raises(ValueError, match="holds 3 prompts; this run needs 4"):
        file_prompts(tok, str(path), 4)
    for bad, words in [("{oops", "line 2: not JSON"), ('{"text": "x"}', "line 2: expected"),
                       ('{"prompt_token_ids": [-1]}', "line 2: expected"),
                       ('{"prompt_token_ids": [99999]}', "line 2: token id 99999"), ('{"prompt": ""}', "line 2: the prompt is empty"),
                       ("[1, 2]", "line 2: expected an object")]:
        path.write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=words):
            file_prompts(tok, str(path), 2)


@pytest.mark.parametrize("concurrency, rate", [(None, None), (2, None), (None, 200.0)])
def test_run_engine_produces_every_token_and_latency(engine_and_model, concurrency, rate):
    engine, _ = engine_and_model
    prompts = bench_prompts(engine.tokenizer, 5, 12)
    stats = run_engine(engine, prompts, gen_len=6, concurrency=concurrency, rate=rate)
    assert len(stats.ttft) == 5 and len(stats.tpot) == 5 and len(stats.itl) == 5 * 5
    assert stats.tokens_per_s > 0 and stats.requests_per_s > 0
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_decode_speed_leaves_the_prefill_out(monkeypatch):
    """A fake engine on a fake clock: the prefill step takes 10 s, each later step 1 s and one token per request.
    Decode tokens/s is the tokens after each first over the time from the first first token to the last end."""
    import types

    from slimlm.serve import bench

    clock = [0.0]

    class FakeEngine:
        block_manager = types.SimpleNamespace(reset_prefix_cache=lambda: None)

        def __init__(self):
            self.requests, self.steps = {}, 0

        def add_request(self, rid, prompt, params, arrival_time=None):
            self.requests[rid] = []

        def has_unfinished(self):
            return bool(self.requests)

        def step(self):
            clock[0] += 10.0 if self.steps == 0 else 1.0
            self.steps += 1
            outs = []
            for rid, toks in list(self.requests.items()):
                toks.append(1)
                done = len(toks) == 5
                outs.append(types.SimpleNamespace(request_id=rid, outputs=[types.SimpleNamespace(token_ids=list(toks))],
                                                  finished=done, metrics={}))
                if done:
                    del self.requests[rid]
            return outs

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=lambda s: None))
    one = run_engine(FakeEngine(), [[1, 2, 3]], gen_len=5)
    assert one.decode_tokens_per_s == pytest.approx(1.0) and one.tokens_per_s == pytest.approx(5 / 14)
    two = run_engine(FakeEngine(), [[1, 2, 3], [4, 5, 6]], gen_len=5)  # both prefilled in the first step
    assert two.decode_tokens_per_s == pytest.approx(2.0) and two.tokens_per_s == pytest.approx(10 / 14)


def test_closed_loop_ttft_starts_when_the_client_sends(engine_and_model):
    """At concurrency 1 each request is sent when the previous one finishes: its TTFT is one prefill, not the
    time spent waiting for earlier requests (which would make the 4th TTFT about 3/4 of the whole run)."""
    import time

    engine, _ = engine_and_model
    prompts = bench_prompts(engine.tokenizer, 4, 8)
    start = time.perf_counter()
    stats = run_engine(engine, prompts, gen_len=30, concurrency=1)
    wall = time.perf_counter() - start
    assert len(stats.ttft) == 4 and max(stats.ttft) < 0.25 * wall


def test_benchmark_reports_rows_and_ratios(engine_and_model):
    engine, model = engine_and_model
    result = benchmark(engine, model, batch_sizes=(1, 2), concurrency=2, num_requests=3, prompt_len=8,
                       gen_len=4, reps=1)
    assert set(result["rows"]) == {"engine batch 1", "hf batch 1", "engine batch 2", "hf batch 2", "engine online c=2"}
    assert "engine batch 1 / hf batch 1" in result["ratios"] and "engine online c=2 / hf batch 2" in result["ratios"]
    assert all(0 < result["rows"][f"engine batch {b}"]["decode_tokens_per_s"]["median"] for b in (1, 2))
    row = result["rows"]["engine online c=2"]
    assert row["ttft_p50_ms"]["min"] <= row["ttft_p50_ms"]["median"] <= row["ttft_p50_ms"]["max"]


def test_percentile():
    assert percentile([3, 1, 2], 50) == 2 and percentile(list(range(101)), 99) == 99


def test_interleaved_benchmark_alternates_engines_with_a_rotating_start(engine_and_model, monkeypatch):
    """Warm-ups first, then each repetition runs every engine once, starting one engine later each time;
    every engine's values are its own runs, in repetition order."""
    from slimlm.serve import bench

    engine, _ = engine_and_model
    other = LLMEngine(tiny_model("llama", seed=1)[0], engine.tokenizer, EngineConfig(block_size=4))
    calls, real = [], bench.run_engine

    def counting(eng, prompts, gen_len, concurrency=None, rate=None, seed=0):
        stats = real(eng, prompts, gen_len, concurrency, rate, seed)
        calls.append((0 if eng is engine else 1, len(prompts)))
        stats.tokens_per_s = float(len(calls))  # the call's index identifies which run a value came from
        stats.decode_tokens_per_s = 100.0 + len(calls)
        return stats

    monkeypatch.setattr(bench, "run_engine", counting)
    results = bench.benchmark_interleaved([engine, other], concurrency=2, num_requests=3, prompt_len=8, gen_len=3, reps=3)
    order = [e for e, _ in calls]
    assert order[:8] == [0, 1, 0, 1, 1, 0, 0, 1] and order[8:] == order[:8]  # batch 1, then c=2, alike
    assert [n for _, n in calls] == [1] * 8 + [3] * 8
    assert results[0]["values"]["batch1_tok_s"] == [3.0, 6.0, 7.0] and results[1]["values"]["batch1_tok_s"] == [4.0, 5.0, 8.0]
    assert results[1]["values"]["online_tok_s"] == [12.0, 13.0, 16.0]
    assert results[0]["values"]["batch1_decode_tok_s"] == [103.0, 106.0, 107.0]
    assert results[0]["rows"]["engine batch 1"]["decode_tokens_per_s"]["median"] == 106.0
    row = results[0]["rows"]["engine online c=2"]
    assert set(results[0]["rows"]) == {"engine batch 1", "engine online c=2"} and len(results[0]["values"]["ttft_p50_ms"]) == 3
    assert row["tokens_per_s"]["median"] == 14.0 and results[0]["settings"]["interleaved"] is True
    with pytest.raises(ValueError, match="reps"):
        bench.benchmark_interleaved([engine], concurrency=2, reps=0)
