"""A fake engine that follows LLMEngine's interface, and a live uvicorn server on loopback.

The fake is deterministic (completion j of every request spells the alphabet starting at letter
j), records what it was asked (adds, aborts), can be held (`gate`) to keep requests in flight, and
can be told to fail a step, so server behaviour is tested apart from the model. Like the real
engine it mutates its output objects in place, which checks that the server snapshots them.
"""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
import uvicorn

from slimlm.serve.engine.outputs import CompletionOutput, RequestOutput
from slimlm.toolkit.models.tiny import byte_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class FakeEngine:
    def __init__(self, max_model_len: int = 64, step_delay: float = 0.0, model_name: str = "fake-model"):
        self.tokenizer = byte_tokenizer()
        self.model_name = model_name
        self.config = SimpleNamespace(max_model_len=max_model_len)
        self.step_delay = step_delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next_step = False
        self.added: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self._live: dict[str, RequestOutput] = {}
        self._params: dict[str, object] = {}
        self.steps = 0

    def add_request(self, request_id, prompt_token_ids, params):
        if request_id in self._live:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise ValueError("prompt too long")
        self.added.append((request_id, list(prompt_token_ids), params))
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                 top_logprobs=[] if params.logprobs else None) for i in range(params.n)]
        out = RequestOutput(request_id, list(prompt_token_ids), outs)
        if params.prompt_logprobs is not None:
            out.prompt_logprobs = [None] + [-1.0] * (len(prompt_token_ids) - 1)
            out.prompt_top_logprobs = [None] + [[(t, -1.0)] for t in prompt_token_ids[1:]]
        self._live[request_id] = out
        self._params[request_id] = params

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self._live.pop(request_id, None)

    def has_unfinished(self):
        return bool(self._live)

    def step(self):
        self.gate.wait()
        if self.step_delay:
            time.sleep(self.step_delay)
        self.steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated engine failure")
        advanced = []
        for rid, out in list(self._live.items()):
            params = self._params[rid]
            for comp in out.outputs:
                if comp.finish_reason:
                    continue
                letter = ALPHABET[(len(comp.token_ids) + comp.index) % 26]
                comp.token_ids.append(ord(letter))
                if comp.logprobs is not None:
                    comp.logprobs.append(-0.5)
                if comp.top_logprobs is not None:
                    alts = [(ord(letter), -0.5), (ord("?"), -1.5), (ord("!"), float("-inf"))]
                    comp.top_logprobs.append(alts[:max(params.logprobs, 1)])
                comp.text += letter
                for stop in params.stop:
                    if stop in comp.text:
                        comp.text = comp.text[:comp.text.index(stop)]
                        comp.finish_reason, comp.stop_reason = "stop", stop
                if comp.finish_reason is None and len(comp.token_ids) >= params.max_tokens:
                    comp.finish_reason = "length"
            out.finished = all(c.finish_reason for c in out.outputs)
            if out.finished:
                del self._live[rid]
            advanced.append(out)
        return advanced

    def stats(self):
        live = len(self._live)
        return {"running": live, "waiting": 0, "kv_blocks_used": live, "kv_blocks_free": 100 - live,
                "prefix_cache_hit_rate": 0.0, "prompt_tokens_total": sum(len(a[1]) for a in self.added),
                "generation_tokens_total": self.steps}


class LiveServer:
    """uvicorn in a thread on a socket bound here (no port race), stopped on exit."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def make_server():
    """`make_server(engine, **create_app_kwargs)` -> a started LiveServer; all stopped at teardown."""
    from slimlm.serve.api import create_app

    started = []

    def make(engine, **kwargs) -> LiveServer:
        server = LiveServer(create_app(engine, **kwargs)).__enter__()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def shared_fake():
    """One fake engine and server for the many tests that do not change their settings."""
    from slimlm.serve.api import create_app

    engine = FakeEngine()
    with LiveServer(create_app(engine)) as server:
        yield engine, server


@pytest.fixture(scope="session")
def api():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    return SimpleNamespace(FakeEngine=FakeEngine, LiveServer=LiveServer, wait_for=wait_for)
