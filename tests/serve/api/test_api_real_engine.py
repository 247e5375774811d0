"""The server on the real LLMEngine with a tiny random Llama: what reaches the client is what the engine
computed (greedy identity with an offline engine, prompt logprobs equal to HF's), and cancelled
requests give their KV blocks back."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from slimlm.serve.engine.engine import EngineConfig, LLMEngine
from slimlm.serve.sampling_params import SamplingParams
from slimlm.toolkit.models import tiny_model

NAME = "tiny-llama"
PROMPTS = ["The quick brown fox", "hello", "Once upon a time, in a land", "1 2 3 4"]


def _engine(hf, tok) -> LLMEngine:
    config = EngineConfig(num_blocks=300, block_size=16, max_model_len=4096, max_num_seqs=8)
    return LLMEngine(hf, tok, config, model_name=NAME)


@pytest.fixture(scope="module")
def real(api):
    from slimlm.serve.api import create_app

    hf, tok = tiny_model("llama", max_position_embeddings=4096)
    engine = _engine(hf, tok)
    with api.LiveServer(create_app(engine)) as server:
        yield hf, tok, engine, server


def _offline(hf, tok, prompt_ids: list[int], params: SamplingParams):
    engine = _engine(hf, tok)
    engine.add_request("r", prompt_ids, params)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    return final


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _metric(server, name: str, default: float | None = None) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise KeyError(name)
    return default


def test_greedy_completion_matches_offline_engine(real):
    hf, tok, _, server = real
    for prompt in PROMPTS[:2]:
        r = _client(server).completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                               logprobs=0)
        ref = _offline(hf, tok, tok.encode(prompt), SamplingParams(max_tokens=12, temperature=0, logprobs=0))
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(ref.outputs[0].logprobs, abs=1e-5)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert _metric(server, "slimlm_num_preemptions_total") == 0  # 300 blocks: room for every request


def test_echo_prompt_logprobs_equal_hf(real):
    hf, tok, _, server = real
    prompt = PROMPTS[2]
    ids = tok.encode(prompt)
    r = _client(server).completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert r.choices[0].text == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
    for t in range(1, len(ids)):  # the chosen token is listed, and the top value is the true max
        assert lp.tokens[t] in lp.top_logprobs[t]
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)


def test_lm_eval_style_loglikelihood_request(real):
    """lm-eval's local-completions: echo, max_tokens 1, logprobs 1, temperature 0, batched prompts."""
    _, tok, _, server = real
    body = {"model": NAME, "prompt": [tok.encode(p) for p in PROMPTS], "max_tokens": 1, "logprobs": 1,
            "echo": True, "temperature": 0, "seed": 1234}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice, prompt in zip(out["choices"], PROMPTS):
        n = len(tok.encode(prompt))
        lps, tops = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
        assert len(lps) == n + 1 and lps[0] is None and all(isinstance(v, float) for v in lps[1:])
        assert lps[-1] == pytest.approx(max(tops[-1].values()))  # greedy: the last token is the argmax


def test_chat_stream_equals_chat_sync(real):
    _, _, _, server = real
    messages = [{"role": "system", "content": "short"}, {"role": "user", "content": "hi there"}]
    client = _client(server)
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_async_concurrent_equals_sequential(real):
    _, _, _, server = real
    sequential = [_client(server).completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0,
                                                     seed=0).choices[0].text for p in PROMPTS]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*[client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0)
                                    for p in PROMPTS * 2])
        await client.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(main()) == sequential * 2


def test_seeded_sampling_with_n_is_reproducible(real):
    _, _, _, server = real
    kw = dict(model=NAME, prompt="abc", max_tokens=6, temperature=1.0, n=3, seed=42)
    a = _client(server).completions.create(**kw)
    b = _client(server).completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3


def test_too_long_prompt_and_bad_ids_are_400(real):
    _, _, _, server = real
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="x" * 5000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[1, 100000])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x" * 4000, max_tokens=200)
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None


def test_disconnect_mid_stream_frees_kv_blocks(real, api):
    _, _, _, server = real
    abort_metric = 'slimlm_request_finished_total{finish_reason="abort"}'
    before = _metric(server, abort_metric, default=0.0)
    body = {"model": NAME, "prompt": "go", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # 4000 tokens take seconds here; the abort must come long before that.
    assert api.wait_for(lambda: _metric(server, abort_metric, default=0.0) > before, timeout=10)
    assert api.wait_for(lambda: _metric(server, "slimlm_kv_blocks_used") == 0, timeout=10)
    assert _metric(server, "slimlm_num_requests_inflight") == 0


def _token_bytes(name: str) -> bytes:
    """A logprob listing's token name back to its bytes (`bytes:\\xNN...` for part of a character)."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name[len("bytes:"):].split("\\x")[1:])
    return name.encode()


def test_logprob_tokens_carry_their_own_bytes_where_a_character_spans_tokens(real):
    # A token holding part of a character decodes to U+FFFD alone; its listing must still give its own bytes
    # (chat's `bytes`, completions' `bytes:\xNN` names), and text offsets must index the text.
    _, tok, _, server = real
    prompt = "日本の首都は 🎉 é"
    ids = tok(prompt).input_ids
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some token holds part of a character
    body = {"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    lp = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    raw = [_token_bytes(t) for t in lp["tokens"]]
    assert b"".join(raw).decode() == tok.decode(ids)
    for j, offset in enumerate(lp["text_offset"]):  # the character the token's first byte belongs to
        assert offset == len(b"".join(raw[:j]).decode("utf-8", errors="ignore")), (j, lp["text_offset"])
    # streamed, with generated tokens: the same names and offsets as the response in one piece
    body.update(max_tokens=6, temperature=0, ignore_eos=True)
    whole = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    lines = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}).text.splitlines()
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == whole["tokens"]
    assert [o for s in streamed for o in s["text_offset"]] == whole["text_offset"]
    # chat: each entry's bytes are the token's own, so joined they rebuild the reply's characters
    reply = httpx.post(server.url + "/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0,
        "logprobs": True}).json()["choices"][0]
    content = reply["logprobs"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace") == reply["message"]["content"]
    assert all(bytes(e["bytes"]) == _token_bytes(e["token"]) for e in content)
