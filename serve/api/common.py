"""What both generation endpoints share: limits, sampling parameters, submission, streaming.

Every check that can be made before the engine sees a request is made here, so a bad request costs
no engine time and gets a message that names the field. Cancellation is handled in one place too:
whichever way a handler ends (done, error, client gone, server stopping), `Batch.abort()` runs, so
an abandoned request never keeps KV blocks.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from slimlm.serve.sampling_params import SamplingParams

from .metrics import Metrics
from .protocol import APIError, error_body
from .worker import Batch, EngineError, EngineWorker, QueueFull

log = logging.getLogger("slimlm.serve.api")


def _byte_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, used by Llama 3, Qwen, SmolLM...): each byte written as one
    printable character, printable ASCII and Latin-1 as themselves, the other bytes from U+0100 on."""
    shown = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in shown:
            chars[chr(b)] = b
        else:
            chars[chr(0x100 + extra)] = b
            extra += 1
    return chars


BYTE_CHARS = _byte_chars()


def token_bytes(tokenizer, tid: int) -> bytes:
    """A token's own bytes. Its decoded text where that is whole; a token holding part of a UTF-8 character
    decodes to U+FFFD, so its bytes come from its name in the vocabulary instead (a byte-level BPE name, or
    SentencePiece's byte fallback `<0xNN>`)."""
    piece = tokenizer.decode([tid])
    if "\ufffd" not in piece:
        return piece.encode()
    name = tokenizer.convert_ids_to_tokens(tid)
    if isinstance(name, str) and name:
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if all(c in BYTE_CHARS for c in name):
            return bytes(BYTE_CHARS[c] for c in name)
    return piece.encode()


def token_text(raw: bytes) -> str:
    """A token's text for logprob listings: its bytes as UTF-8, or `bytes:\\xNN...` (OpenAI's form) where they
    are part of a character, so two such tokens never share a name."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def lead_bytes(raw: bytes) -> int:
    """Characters that start in `raw` (UTF-8 bytes that are not continuation bytes)."""
    return sum((b & 0xC0) != 0x80 for b in raw)


@dataclass
class ServerContext:
    """The engine-facing state of one app; built once by `create_app`."""

    engine: object
    worker: EngineWorker
    metrics: Metrics
    max_tokens_limit: int | None = None
    retry_after_s: int = 1
    token_bytes: Callable[[int], bytes] = field(init=False)

    def __post_init__(self):
        tok = self.engine.tokenizer
        # One token's bytes, for logprob listings; cached because prompts repeat the same ids.
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(lambda tid: token_bytes(tok, tid))
        self._encode_lock = threading.Lock()
        # No token spans more characters than the longest in the vocabulary (a byte-level token's string has a
        # character per byte; x4 leaves room for normalizers that fold characters), so a text past this many
        # characters cannot fit the context: refused without tokenizing it (which holds the lock for seconds).
        self._max_prompt_chars: int | None = None

    def piece(self, tid: int) -> str:
        """One token as logprob listings name it: its text, or `bytes:\\xNN...` where it holds part of a character."""
        return token_text(self.token_bytes(tid))

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Tokenize off the event loop's thread; one at a time, because a fast tokenizer shared by
        threads can fail with "Already borrowed" when encodes overlap."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's "\ud83c" alone: valid JSON, no text (the tokenizer's TypeError)
            raise APIError(400, f"{param} holds an unpaired UTF-16 surrogate (U+{ord(text[exc.start]):04X}); "
                                "\\uD800-\\uDFFF escapes must come in pairs", param=param) from exc
        if self._max_prompt_chars is None:
            longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
            self._max_prompt_chars = 4 * self.max_model_len * longest
        if len(text) > self._max_prompt_chars:
            raise APIError(400, f"{param} has {len(text):,} characters, more than this model's maximum context "
                                f"length of {self.max_model_len} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")
        with self._encode_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r} (or omit `model`)", param="model", code="model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


def vocab_size(ctx: ServerContext) -> int:
    """The ids a request may name: the tokenizer's, or the model's where its embedding is larger (padded)."""
    model_vocab = getattr(getattr(getattr(ctx.engine, "model", None), "args", None), "vocab_size", None)
    return max(len(ctx.tokenizer), model_vocab or 0)


def check_prompt(ctx: ServerContext, ids: list[int], where: str, param: str = "prompt") -> None:
    """Refuse empty prompts, ids outside the vocabulary and prompts with no room to generate (`param`: the
    request field they came from)."""
    if not ids:
        raise APIError(400, f"{where} is empty; send at least one token of text", param=param)
    vocab = vocab_size(ctx)
    if min(ids) < 0 or max(ids) >= vocab:
        raise APIError(400, f"{where}: token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}",
                       param=param)
    if len(ids) >= ctx.max_model_len:
        raise APIError(400, f"{where} has {len(ids)} tokens, but this model's maximum context length is "
                            f"{ctx.max_model_len} tokens (prompt plus at least one new token); shorten it",
                       param=param, code="context_length_exceeded")


def resolve_max_tokens(ctx: ServerContext, requested: int | None, prompt_len: int, default: int | None,
                       field_name: str = "max_tokens") -> int:
    """The output budget: the request's, checked against context and limits, or a default that fits."""
    room = ctx.max_model_len - prompt_len
    if requested is None:
        budget = room if default is None else min(default, room)
        return min(budget, ctx.max_tokens_limit or budget)
    if requested < 1:
        raise APIError(400, f"{field_name} must be at least 1, got {requested}", param=field_name)
    if ctx.max_tokens_limit is not None and requested > ctx.max_tokens_limit:
        raise APIError(400, f"{field_name} is {requested}, but this server allows at most "
                            f"{ctx.max_tokens_limit}", param=field_name)
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {ctx.max_model_len} tokens; the prompt "
                            f"has {prompt_len} and {field_name} asks for {requested} more; lower {field_name} "
                            f"to at most {room}", param=field_name, code="context_length_exceeded")
    return requested


def make_params(ctx: ServerContext, body, max_tokens: int, logprobs: int | None,
                prompt_logprobs: int | None) -> SamplingParams:
    """SamplingParams from the request; its ValueError (a bad value) becomes a 400 naming it."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if body.stop_token_ids and not all(0 <= t < vocab_size(ctx) for t in body.stop_token_ids):
        bad = next(t for t in body.stop_token_ids if not 0 <= t < vocab_size(ctx))
        raise APIError(400, f"stop_token_ids: token ids must be in [0, {vocab_size(ctx)}); got {bad}",
                       param="stop_token_ids")
    kw = dict(max_tokens=max_tokens, stop=stop_list(body.stop), logprobs=logprobs,
              prompt_logprobs=prompt_logprobs)
    for name in ("temperature", "top_p", "top_k", "min_p", "n", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos"):
        value = getattr(body, name)
        if value is not None:
            kw[name] = value
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as exc:
        named = str(exc).split(" ", 1)[0]  # SamplingParams' messages begin with the field they are about
        raise APIError(400, str(exc), param=named if named in kw else None) from exc


async def submit(ctx: ServerContext, requests: list[tuple[str, list[int], SamplingParams]]) -> Batch:
    """Hand requests to the engine thread and wait until it took them (so refusals are 4xx)."""
    try:
        batch = ctx.worker.submit(requests)
    except QueueFull as exc:
        ctx.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, str(exc), code="queue_full",
                       headers={"Retry-After": str(ctx.retry_after_s)}) from exc
    try:
        await batch.accepted()
    except ValueError as exc:
        batch.abort()
        raise APIError(400, str(exc)) from exc
    except EngineError as exc:
        batch.abort()
        raise APIError(503, str(exc), type="service_unavailable") from exc
    except BaseException:
        batch.abort()
        raise
    return batch


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(batch: Batch, request: Request) -> dict[int, object] | None:
    """Final output per prompt index, or None if the client left first (its requests aborted)."""
    finals: dict[int, object] = {}

    async def consume():
        async for index, out in batch.outputs():
            if out.finished:
                finals[index] = out

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            return None
        try:
            work.result()
        except EngineError as exc:
            raise APIError(500, str(exc), type="server_error") from exc
        return finals
    finally:
        for task in (work, watch):
            task.cancel()
        batch.abort()


def finite(value: float | None) -> float | None:
    """JSON has no infinities: a token the sampling filters ruled out (-inf) is sent as -9999.0, as
    vLLM does, and NaN as null; otherwise the response would be a 500 or invalid JSON."""
    if value is None or value != value:
        return None
    return max(float(value), -9999.0)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(Response):
    """Server-sent events that notice a client leaving even while no token is due.

    Starlette's StreamingResponse only learns of a disconnect when a write fails (ASGI >= 2.4) or
    through a listener it owns; here a watcher on `receive` runs beside the writer, and when either
    ends the other is cancelled and the generator closed, so its `finally` aborts the request now.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump():
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                while True:
                    try:
                        chunk = await self.events.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # a bug in the events past the 200: said in-band and logged
                        log.exception("a stream failed")
                        chunk = stream_error(RuntimeError(f"internal server error ({type(exc).__name__})")) + SSE_DONE
                        await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                        break
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away mid-write
                pass

        writer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()


def stream_error(exc: Exception) -> str:
    """An error after the 200 went out can only be reported in-band, as vLLM and OpenAI do."""
    return sse(error_body(str(exc), "server_error"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
