"""`serve.api.common.EventStream`: how a stream of server-sent events ends."""
from __future__ import annotations

import asyncio
import json

from slimlm.serve.api.common import EventStream


def test_a_stream_that_fails_past_the_200_ends_with_an_error_event_and_done(caplog):
    """A bug in an events generator ended the response without its last body (the client saw a cut connection),
    and nothing was logged."""
    async def events():
        yield 'data: {"a": 1}\n\n'
        raise KeyError("a bug")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)  # the client stays

    asyncio.run(EventStream(events())({"type": "http"}, receive, send))
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    text = b"".join(m["body"] for m in bodies).decode()
    lines = [line for line in text.split("\n\n") if line]
    assert lines[0] == 'data: {"a": 1}' and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert "a stream failed" in caplog.text
