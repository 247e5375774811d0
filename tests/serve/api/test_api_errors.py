"""Bad requests get OpenAI-shaped 4xx errors and the server keeps serving; backpressure; cancellation."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

# (name, path, body: dict (sent as JSON) or bytes (sent raw), expected status)
BAD = [
    ("empty prompt", C, {"prompt": ""}, 400),
    ("empty prompt list", C, {"prompt": []}, 400),
    ("empty token list in batch", C, {"prompt": [[1], []]}, 400),
    ("prompt longer than max_model_len", C, {"prompt": "x" * 100}, 400),
    ("prompt fills the context", C, {"prompt": "x" * 64}, 400),
    ("token id outside vocab", C, {"prompt": [1, 10**6]}, 400),
    ("negative token id", C, {"prompt": [-1]}, 400),
    ("max_tokens 0 without echo", C, {"prompt": "x", "max_tokens": 0}, 400),
    ("max_tokens negative", C, {"prompt": "x", "max_tokens": -5}, 400),
    ("max_tokens huge", C, {"prompt": "x", "max_tokens": 10**12}, 400),
    ("max_tokens past context", C, {"prompt": "x" * 60, "max_tokens": 5}, 400),
    ("chat max_tokens 0", CHAT, {"messages": MSG, "max_tokens": 0}, 400),
    ("chat max_tokens huge", CHAT, {"messages": MSG, "max_completion_tokens": 2**40}, 400),
    ("chat max_tokens negative beside max_completion_tokens", CHAT,
     {"messages": MSG, "max_tokens": -3, "max_completion_tokens": 5}, 400),
    ("huge n", C, {"prompt": "x", "n": 10**6}, 400),
    ("n zero", C, {"prompt": "x", "n": 0}, 400),
    ("chat huge n", CHAT, {"messages": MSG, "n": 1000}, 400),
    ("temperature string", C, {"prompt": "x", "temperature": "hot"}, 400),
    ("max_tokens numeric string", C, {"prompt": "x", "max_tokens": "5"}, 400),
    ("max_tokens float", C, {"prompt": "x", "max_tokens": 2.5}, 400),
    ("prompt a number", C, {"prompt": 5}, 400),
    ("prompt list of bools", C, {"prompt": [True, False]}, 400),
    ("prompt mixed list", C, {"prompt": ["a", 1]}, 400),
    ("stream a string", C, {"prompt": "x", "stream": "yes"}, 400),
    ("stop a number", C, {"prompt": "x", "stop": 3}, 400),
    ("missing prompt", C, {"max_tokens": 3}, 400),
    ("messages a string", CHAT, {"messages": "hi"}, 400),
    ("message without role", CHAT, {"messages": [{"content": "hi"}]}, 400),
    ("unknown role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("empty messages", CHAT, {"messages": []}, 400),
    ("image content part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("body is a list", C, [1, 2, 3], 400),
    ("body is a string", C, "prompt", 400),
    ("invalid JSON", C, b'{"prompt": "x",', 400),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe\xc3"}', 400),
    ("NaN temperature", C, b'{"prompt": "x", "temperature": NaN}', 400),
    ("infinite top_p", C, b'{"prompt": "x", "top_p": Infinity}', 400),
    ("unknown model", C, {"model": "gpt-4", "prompt": "x"}, 404),
    ("chat unknown model", CHAT, {"model": "nope", "messages": MSG}, 404),
    ("negative temperature", C, {"prompt": "x", "temperature": -0.5}, 400),
    ("chat negative temperature", CHAT, {"messages": MSG, "temperature": -1}, 400),
    ("top_p zero", C, {"prompt": "x", "top_p": 0}, 400),
    ("top_p above one", C, {"prompt": "x", "top_p": 1.5}, 400),
    ("chat top_p above one", CHAT, {"messages": MSG, "top_p": 2}, 400),
    ("1000 stop strings", C, {"prompt": "x", "stop": [f"s{i}" for i in range(1000)]}, 400),
    ("chat 1000 stop strings", CHAT, {"messages": MSG, "stop": ["z"] * 1000}, 400),
    ("empty stop string", C, {"prompt": "x", "stop": [""]}, 400),
    ("logprobs too many", C, {"prompt": "x", "logprobs": 1000}, 400),
    ("top_logprobs without logprobs", CHAT, {"messages": MSG, "top_logprobs": 3}, 400),
    ("chat top_logprobs too many", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 99}, 400),
    ("presence penalty out of range", C, {"prompt": "x", "presence_penalty": 5}, 400),
    ("repetition penalty zero", C, {"prompt": "x", "repetition_penalty": 0}, 400),
    ("seed too large", C, {"prompt": "x", "seed": 2**70}, 400),
    ("logit_bias", C, {"prompt": "x", "logit_bias": {"1": 5}}, 400),
    ("negative stop token id", C, {"prompt": "x", "stop_token_ids": [-1]}, 400),
    ("stop token id outside vocab", CHAT, {"messages": MSG, "stop_token_ids": [10**9]}, 400),
    ("an earlier turn's tool calls", CHAT, {"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "1", "tool_call_id": "a"}]}, 400),
    ("empty body", C, b"", 400),
    ("best_of above n", C, {"prompt": "x", "best_of": 3}, 400),
    ("too many prompts", C, {"prompt": ["x"] * 300}, 400),
    ("body too large", C, {"prompt": "x" * (5 * 2**20)}, 413),
    # valid JSON, but no text: the tokenizer's TypeError was a 500, which the openai client retries
    ("unpaired surrogate in the prompt", C, b'{"prompt": "hi \\ud83c there"}', 400),
    ("unpaired surrogate in a prompt list", C, b'{"prompt": ["ok", "\\udfff"]}', 400),
    ("unpaired surrogate in a message", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400),
]


def _send(url: str, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(url, json=body, **kw)


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_and_server_keeps_serving(shared_fake, name, path, body, status):
    engine, server = shared_fake
    before = len(engine.added)
    r = _send(server.url + path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert len(engine.added) == before  # refused before the engine saw it
    ok = httpx.post(server.url + C, json={"prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ab"


def test_error_messages_name_the_problem(shared_fake):
    engine, server = shared_fake
    r = _send(server.url + C, {"prompt": "x", "temperature": "hot"}).json()["error"]
    assert r["param"] == "temperature" and r["type"] == "invalid_request_error"
    r = _send(server.url + C, {"prompt": "x", "top_p": 1.5}).json()["error"]
    assert "top_p" in r["message"] and r["param"] == "top_p"  # a bad value, checked by SamplingParams
    r = _send(server.url + C, {"prompt": "x", "n": 0}).json()["error"]
    assert r["param"] == "n"
    r = _send(server.url + C, {"prompt": "x", "stop": ["s"] * 17}).json()["error"]
    assert r["param"] == "stop" and "at most 16" in r["message"]
    r = _send(server.url + CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}).json()["error"]
    assert r["param"] == "messages.0.content" and r["message"].endswith("got a text part without `text`")
    r = _send(server.url + CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}).json()["error"]
    assert r["param"] == "top_logprobs" and r["message"].startswith("top_logprobs must be in [0, 20]")
    r = _send(server.url + CHAT, {"messages": [{"role": "robot", "content": "hi"}]}).json()["error"]
    assert r["param"] == "messages.0.role" and "'robot'" in r["message"] and "user" in r["message"]
    r = _send(server.url + C, {"prompt": "x" * 100}).json()["error"]
    assert r["code"] == "context_length_exceeded" and "64" in r["message"] and r["param"] == "prompt"
    r = _send(server.url + CHAT, {"messages": [{"role": "user", "content": "x" * 100}]}).json()["error"]
    assert r["code"] == "context_length_exceeded" and r["param"] == "messages"
    # A field of several forms: the field and its forms, not pydantic's name of one form ("prompt.str")
    r = _send(server.url + C, {"prompt": None}).json()["error"]
    assert r["param"] == "prompt" and r["message"] == "`prompt` must be one of: str, list[str], list[int], " \
        "list[list[int]]; got null"
    r = _send(server.url + C, {"prompt": "x", "stop": [1]}).json()["error"]
    assert r["param"] == "stop" and "more problems" not in r["message"]
    assert r["message"].endswith("got an array whose item 0 is not valid: Input should be a valid string")
    r = _send(server.url + C, {"prompt": [[1, 2], [3, "a"]]}).json()["error"]  # the form read furthest names it
    assert r["message"].endswith("got an array whose item 1.1 is not valid: Input should be a valid integer")
    r = _send(server.url + C, b'{"prompt": "hi \\ud83c there"}').json()["error"]
    assert r["param"] == "prompt" and r["message"].startswith("prompt holds an unpaired UTF-16 surrogate (U+D83C);")
    r = _send(server.url + CHAT, b'{"messages": [{"role": "user", "content": "\\udc00"}]}').json()["error"]
    assert r["param"] == "messages" and "(U+DC00)" in r["message"]
    r = _send(server.url + C, b'{"prompt": "a \\ud83c\\udf89 pair"}')  # a pair is one character: fine
    assert r.status_code == 200
    engine.added.clear()
    r = _send(server.url + C, {"prompt": "ab " * 200_000}).json()["error"]  # refused before it is tokenized
    assert r["code"] == "context_length_exceeded" and r["message"].startswith("prompt has 600,000 characters")
    r = _send(server.url + CHAT, {"messages": [{"role": "user", "content": "é" * 400_000}]}).json()["error"]
    assert r["code"] == "context_length_exceeded" and r["param"] == "messages" and not engine.added
    r = _send(server.url + C, {"model": "gpt-4", "prompt": "x"}).json()["error"]
    assert r["code"] == "model_not_found" and "fake-model" in r["message"]
    r = _send(server.url + C, {"prompt": "x", "stop_token_ids": [0, 10**9]}).json()["error"]
    assert r["param"] == "stop_token_ids" and r["message"].endswith("got 1000000000")
    r = _send(server.url + C, b"").json()["error"]
    assert r["message"].startswith("the request body is empty; send a JSON object")
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + C)
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_typed_errors(shared_fake):
    _, server = shared_fake
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="fake-model", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MSG)


def test_queue_full_gives_429_with_retry_after(api, make_server):
    engine = api.FakeEngine()
    server = make_server(engine, max_queue=2, retry_after_s=3)
    engine.gate.clear()  # steps block: accepted requests stay in flight

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            held = [asyncio.create_task(client.post(C, json={"prompt": "x", "max_tokens": 2})) for _ in range(2)]
            worker = server.app.state.ctx.worker
            assert await asyncio.to_thread(api.wait_for, lambda: worker.num_inflight == 2)
            refused = await client.post(C, json={"prompt": "x"})
            batch_refused = await client.post(C, json={"prompt": ["a", "b"]})
            engine.gate.set()
            done = await asyncio.gather(*held)
            after = await client.post(C, json={"prompt": ["a", "b"], "max_tokens": 1})
            return refused, batch_refused, done, after

    try:
        refused, batch_refused, done, after = asyncio.run(main())
    finally:
        engine.gate.set()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert batch_refused.status_code == 429
    assert [r.status_code for r in done] == [200, 200]
    assert after.status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'slimlm_request_rejected_total{reason="queue_full"} 2.0' in metrics


def test_openai_client_sees_rate_limit(api, make_server):
    engine = api.FakeEngine()
    server = make_server(engine, max_queue=1)
    engine.gate.clear()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        with client.completions.create(model="fake-model", prompt="x", stream=True):
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="fake-model", prompt="x")
    finally:
        engine.gate.set()


@pytest.mark.parametrize("path,body", [
    (C, {"prompt": "x", "max_tokens": 5000, "stream": True}),
    (CHAT, {"messages": MSG, "max_tokens": 5000, "stream": True, "n": 2}),
])
def test_disconnect_mid_stream_aborts(api, make_server, path, body):
    engine = api.FakeEngine(max_model_len=8192, step_delay=0.01)
    server = make_server(engine)
    with httpx.stream("POST", server.url + path, json=body, timeout=20) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: {") for line in got)
    rid = engine.added[-1][0]
    assert api.wait_for(lambda: rid in engine.aborted, timeout=5), "the request was not aborted"
    assert api.wait_for(lambda: not engine.has_unfinished())
    assert api.wait_for(lambda: "slimlm_num_requests_inflight 0.0" in httpx.get(server.url + "/metrics").text)
    assert engine.steps < 4000  # it stopped long before max_tokens
    aborted = 'slimlm_request_finished_total{finish_reason="abort"} ' + f"{body.get('n', 1)}.0"
    assert aborted in httpx.get(server.url + "/metrics").text  # per completion, as other finish reasons count


def test_disconnect_while_waiting_for_a_full_response_aborts(api, make_server):
    engine = api.FakeEngine(max_model_len=8192, step_delay=0.01)
    server = make_server(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + C, json={"prompt": "x", "max_tokens": 5000}, timeout=0.5)
    rid = engine.added[-1][0]
    assert api.wait_for(lambda: rid in engine.aborted, timeout=5)


def test_engine_failure_is_500_and_server_recovers(api, make_server):
    engine = api.FakeEngine()
    server = make_server(engine)
    engine.fail_next_step = True
    r = httpx.post(server.url + C, json={"prompt": "x", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    engine.fail_next_step = True
    with httpx.stream("POST", server.url + C, json={"prompt": "x", "max_tokens": 3, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert "error" in json.loads(lines[-2][6:]) and lines[-1] == "data: [DONE]"
    ok = httpx.post(server.url + C, json={"prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and httpx.get(server.url + "/health").status_code == 200


def test_chunked_body_over_the_limit_is_413(api, make_server):
    engine = api.FakeEngine()
    server = make_server(engine, max_body_bytes=1000)

    def chunks():  # no Content-Length: the limit must count the bytes themselves
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = httpx.post(server.url + C, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert not engine.added
    ok = httpx.post(server.url + C, json={"prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_wrong_content_type_is_400(shared_fake):
    _, server = shared_fake
    r = httpx.post(server.url + C, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_max_tokens_limit(api, make_server):
    server = make_server(api.FakeEngine(), max_tokens_limit=8)
    r = httpx.post(server.url + C, json={"prompt": "x", "max_tokens": 9})
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
    r = httpx.post(server.url + CHAT, json={"messages": MSG})  # the default respects the limit too
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_shutdown_ends_a_running_stream_with_an_in_band_error(api):
    # Requests in flight get the grace period; a stream still running then ends with the server's error and
    # [DONE], not a connection cut mid-body.
    import socket
    import threading

    from slimlm.serve.api import create_app
    from slimlm.serve.api.app import draining_server

    engine = api.FakeEngine(max_model_len=8192, step_delay=0.01)
    server = draining_server(create_app(engine), grace_s=1.0, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert api.wait_for(lambda: server.started, timeout=20)
    try:
        with httpx.stream("POST", url + C, json={"prompt": "x", "max_tokens": 5000, "stream": True}, timeout=20) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            server.should_exit = True
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and "the server is shutting down" in rest[-2], rest[-3:]
        thread.join(10)
        assert not thread.is_alive()
        assert engine.steps < 4000  # cut at the grace period, not run to max_tokens
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
