"""The OpenAI-compatible server against a fake engine, driven by the official `openai` client."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest


def _client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_completion_sync(shared_fake):
    engine, server = shared_fake
    r = _client(server).completions.create(model="fake-model", prompt="hello", max_tokens=5)
    assert r.choices[0].text == "abcde"
    assert r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == "fake-model"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 5, 10)
    assert engine.added[-1][1] == list(b"hello")


def test_completion_prompt_shapes_and_n(shared_fake):
    engine, server = shared_fake
    client = _client(server)
    r = client.completions.create(model="fake-model", prompt=["a", "bb"], max_tokens=3, n=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "abc"), (1, "bcd"), (2, "abc"), (3, "bcd")]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 12
    r = client.completions.create(model="fake-model", prompt=[104, 105], max_tokens=2)
    assert r.choices[0].text == "ab" and engine.added[-1][1] == [104, 105]
    r = client.completions.create(model="fake-model", prompt=[[104], [105, 106]], max_tokens=1)
    assert [c.text for c in r.choices] == ["a", "a"]
    assert [a[1] for a in engine.added[-2:]] == [[104], [105, 106]]


def test_completion_sampling_fields_reach_the_engine(shared_fake):
    engine, server = shared_fake
    r = _client(server).completions.create(
        model="fake-model", prompt="x", max_tokens=10, stop=["d"], temperature=0.5, top_p=0.9, seed=7, presence_penalty=0.5,
        frequency_penalty=0.25, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1}, user="me")
    assert r.choices[0].text == "abc" and r.choices[0].finish_reason == "stop"
    p = engine.added[-1][2]
    assert (p.temperature, p.top_p, p.seed, p.top_k, p.min_p) == (0.5, 0.9, 7, 5, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.stop) == (0.5, 0.25, 1.1, ["d"])
    assert p.max_tokens == 10


def test_default_max_tokens_fits_the_context(shared_fake):
    engine, server = shared_fake
    _client(server).completions.create(model="fake-model", prompt="y" * 60)  # max_model_len 64: room for 4
    assert engine.added[-1][2].max_tokens == 4


def test_completion_async_concurrent(shared_fake):
    _, server = shared_fake

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[client.completions.create(model="fake-model", prompt=f"p{i}", max_tokens=2 + i)
                                    for i in range(8)])
        await client.close()
        return rs

    rs = asyncio.run(main())
    assert [r.choices[0].text for r in rs] == ["abcdefghij"[:2 + i] for i in range(8)]


def test_completion_stream(shared_fake):
    _, server = shared_fake
    chunks = list(_client(server).completions.create(model="fake-model", prompt="hi", max_tokens=4, n=2, stream=True,
                                                      stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c.choices:
            text[choice.index] += choice.text
    assert text == {0: "abcd", 1: "bcde"}
    assert sorted(ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason) == ["length"] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None and "usage" in c.model_fields_set for c in chunks[:-1])  # OpenAI: null before the last


def test_stream_ends_with_done(shared_fake):
    _, server = shared_fake
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                                    "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_echo_with_logprobs_prompt_only(shared_fake):
    engine, server = shared_fake
    r = _client(server).completions.create(model="fake-model", prompt="hey", max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == "hey"
    assert c.logprobs.tokens == ["h", "e", "y"]
    assert c.logprobs.token_logprobs == [None, -1.0, -1.0]
    assert c.logprobs.top_logprobs == [None, {"e": -1.0}, {"y": -1.0}]
    assert c.logprobs.text_offset == [0, 1, 2]
    assert r.usage.completion_tokens == 0
    assert engine.added[-1][2].prompt_logprobs == 1


def test_echo_with_logprobs_and_generation(shared_fake):
    _, server = shared_fake
    r = _client(server).completions.create(model="fake-model", prompt="hey", max_tokens=2, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "heyab"
    assert lp.tokens == ["h", "e", "y", "a", "b"]
    assert lp.token_logprobs == [None, -1.0, -1.0, -0.5, -0.5]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[3] == {"a": -0.5, "?": -1.5}
    assert lp.text_offset == [0, 1, 2, 3, 4]
    # Without echo: only generated tokens, offsets from the start of the completion.
    r = _client(server).completions.create(model="fake-model", prompt="hey", max_tokens=2, logprobs=0)
    assert r.choices[0].logprobs.tokens == ["a", "b"] and r.choices[0].logprobs.text_offset == [0, 1]
    assert r.choices[0].logprobs.top_logprobs == [{"a": -0.5}, {"b": -0.5}]


def test_echo_logprobs_stream(shared_fake):
    _, server = shared_fake
    chunks = list(_client(server).completions.create(model="fake-model", prompt="hey", max_tokens=2, echo=True, logprobs=1,
                                                     stream=True))
    assert chunks[0].choices[0].text.startswith("hey")
    assert "".join(c.choices[0].text for c in chunks) == "heyab"
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in chunks for t in c.choices[0].logprobs.text_offset]
    assert tokens == ["h", "e", "y", "a", "b"] and offsets == [0, 1, 2, 3, 4]


def test_chat_sync_uses_the_template(shared_fake):
    engine, server = shared_fake
    r = _client(server).chat.completions.create(
       model="fake-model", messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        max_tokens=3)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "abc"
    assert r.object == "chat.completion" and r.usage.completion_tokens == 3
    rendered = engine.tokenizer.decode(engine.added[-1][1])
    assert rendered == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                        "<|im_start|>assistant\n")
    r = _client(server).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                                max_completion_tokens=2, n=2)
    assert [c.message.content for c in r.choices] == ["ab", "bc"]
    # OpenAI's "developer" message is the system message for a template that does not know the name; text
    # parts are lines of one message
    _client(server).chat.completions.create(
        model="fake-model", max_tokens=1, messages=[{"role": "developer", "content": "be brief"},
                                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}])
    assert engine.tokenizer.decode(engine.added[-1][1]).startswith(
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na\nb<|im_end|>")


def test_chat_stream_role_first(shared_fake):
    _, server = shared_fake
    chunks = list(_client(server).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abcde"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None and "usage" in c.model_fields_set for c in chunks[:-1])
    plain = list(_client(server).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True))
    assert not any("usage" in c.model_fields_set for c in plain)  # not asked for: no usage key at all


def test_chat_logprobs(shared_fake):
    _, server = shared_fake
    r = _client(server).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                                logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == ["a", "b"] and content[0].logprob == -0.5
    assert [t.token for t in content[0].top_logprobs] == ["a", "?"]
    assert content[0].bytes == [97]


def test_chat_stream_async(shared_fake):
    _, server = shared_fake

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await client.close()
        return text

    assert asyncio.run(main()) == "abcd"


def test_models_health_metrics(shared_fake):
    _, server = shared_fake
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    assert client.models.retrieve("fake-model").id == "fake-model"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model="fake-model", prompt="hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("slimlm_num_requests_running", "slimlm_num_requests_waiting", "slimlm_kv_blocks_used",
                 "slimlm_kv_blocks_free", "slimlm_prefix_cache_hit_rate", "slimlm_prompt_tokens_total",
                 "slimlm_generation_tokens_total", "slimlm_time_to_first_token_seconds_bucket",
                 "slimlm_time_per_output_token_seconds_bucket"):
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["slimlm_time_to_first_token_seconds_count"] >= 1
    assert values["slimlm_time_per_output_token_seconds_count"] >= 1
    assert values['slimlm_request_finished_total{finish_reason="length"}'] >= 1
    assert values["slimlm_kv_blocks_free"] == 100 and values["slimlm_num_requests_inflight"] == 0


def test_openapi_schema():
    from slimlm.serve.api import create_app

    schema = create_app(_Stub()).openapi()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "CompletionRequest" in json.dumps(schema)


class _Stub:
    tokenizer = model_name = None
    config = type("C", (), {"max_model_len": 8})


@pytest.mark.parametrize("key", ["secret"])
def test_api_key(api, make_server, key):
    server = make_server(api.FakeEngine(), api_key=key)
    with pytest.raises(openai.AuthenticationError):
        _client(server, api_key="wrong").completions.create(model="fake-model", prompt="x", max_tokens=1)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": key})
    assert r.status_code == 401  # the scheme is required
    assert _client(server, api_key=key).completions.create(model="fake-model", prompt="x", max_tokens=1).choices[0].text == "a"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_infinite_logprobs_stay_valid_json(shared_fake):
    _, server = shared_fake
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["top_logprobs"][0]["!"] == -9999.0
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logprobs": True, "top_logprobs": 3,
        "stream": True})
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    tops = [t["logprob"] for d in data for c in d["choices"] if c["logprobs"]
            for e in c["logprobs"]["content"] for t in e["top_logprobs"]]
    assert -9999.0 in tops


def test_serve_binds_loopback_and_reads_the_key_from_env(api, monkeypatch):
    import types

    from slimlm.serve.api import app as app_module
    from slimlm.serve.api import serve

    seen = {}
    monkeypatch.setattr(app_module, "draining_server",
                        lambda app, **kw: types.SimpleNamespace(run=lambda: seen.update(kw, app=app)))
    monkeypatch.setenv("SLIMLM_API_KEY", "from-env")
    serve(api.FakeEngine())
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    from starlette.testclient import TestClient

    with TestClient(seen["app"]) as client:
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "a"
