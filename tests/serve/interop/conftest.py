"""Interop tests: third-party clients (lm-eval-harness, schemathesis) against a live slimlm server.

The server is the real LLMEngine on a tiny random Llama, in uvicorn on a loopback socket bound here
(no port race), stopped at teardown. The few lines of `LiveServer` repeat tests/serve/api/conftest.py's,
since conftest files are not importable under `--import-mode=importlib`.
"""
from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

MODEL_NAME = "tiny-llama"


class LiveServer:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0, stopped on exit."""

    def __init__(self, app):
        import uvicorn

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


def tiny_engine(hf, tok, max_model_len: int, num_blocks: int):
    from slimlm.serve.engine.engine import EngineConfig, LLMEngine

    config = EngineConfig(num_blocks=num_blocks, block_size=16, max_model_len=max_model_len, max_num_seqs=8)
    return LLMEngine(hf, tok, config, model_name=MODEL_NAME)


@pytest.fixture(scope="session")
def interop():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    return SimpleNamespace(LiveServer=LiveServer, tiny_engine=tiny_engine, MODEL_NAME=MODEL_NAME)
