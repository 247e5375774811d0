"""The FastAPI app: routes, the guard in front of them, and OpenAI-shaped errors for every failure.

Clients of OpenAI-compatible servers (the `openai` package, lm-eval, LangChain) read
`{"error": {"message", "type", "param", "code"}}` and key their behaviour on the status code, so
every error path, including FastAPI's own 422 validation errors (made 400, as OpenAI answers) and
unknown routes, goes through the same shape. Bodies are plain JSON, parsed by pydantic; nothing
is ever unpickled.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .chat import create_chat_completion
from .common import ServerContext, now_s
from .completions import create_completion
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, error_type
from .worker import EngineWorker

log = logging.getLogger("slimlm.serve.api")

MAX_BODY_BYTES = 4 * 2**20


def _error(status: int, message: str, param=None, code=None, headers=None, type=None) -> JSONResponse:
    return JSONResponse(error_body(message, type or error_type(status), param, code), status_code=status,
                        headers=headers)


class _Guard:
    """API key and body size, checked before any routing or parsing.

    The body is read here, up to the limit, and replayed to the app: a Content-Length can be absent
    (chunked uploads) or lie, so counting the bytes is the only sound limit, and a too-large upload
    is refused with 413 before FastAPI buffers or parses it.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                response = _error(401, "missing or invalid API key; send `Authorization: Bearer <key>`",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = _error(413, f"the request body is larger than the server's limit of "
                                f"{self.max_body_bytes} bytes", code="body_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc and first.get("type") == "missing":
        return "the request body is empty; send a JSON object with the header Content-Type: application/json", None
    if not loc and first.get("type") in ("dict_type", "model_attributes_type"):
        return ("the request body is not a JSON object; send one with the header Content-Type: application/json",
                None)
    tag = next((i for i, p in enumerate(loc) if _is_type_tag(p)), None)
    if tag is not None:  # a field of several accepted forms (str | list[int] ...): name the field and its forms
        field = loc[:tag]
        mine = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:tag] == field]
        forms = list(dict.fromkeys(str(e["loc"][len(field) + 1]) for e in mine))
        param = ".".join(field)
        others = len({tuple(e.get("loc", ())) for e in errors if e not in mine})
        more = f" (and {others} more problems)" if others else ""
        got = _json_kind(first.get("input"))
        deep = [e for e in mine if len([p for p in e["loc"] if p != "body"]) > tag + 1]
        if deep:  # an array of wrong items: the form that read furthest into it says which item and how
            item = max(deep, key=lambda e: [p for p in e["loc"] if isinstance(p, int)])
            at = [str(p) for p in item["loc"] if p != "body"][tag + 1:]
            got = f"an array whose item {'.'.join(at)} is not valid: {item.get('msg', 'invalid value')}"
        return f"`{param}` must be one of: {', '.join(forms)}; got {got}{more}", param
    param = ".".join(loc) or None
    where = f"`{param}`: " if param else "the request body: "
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


def _is_type_tag(part: str) -> bool:
    """pydantic's name for one branch of a union in an error's location (`str`, `list[int]`), not a field."""
    return part in ("str", "int", "float", "bool") or "[" in part


def _json_kind(value) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def create_app(engine, api_key: str | None = None, max_queue: int = 256, max_body_bytes: int = MAX_BODY_BYTES,
               max_tokens_limit: int | None = None, retry_after_s: int = 1) -> FastAPI:
    """An OpenAI-compatible app serving `engine` (see slimlm.serve.engine.LLMEngine).

    `max_queue` bounds the engine requests in flight (one per prompt; past it: 429 + Retry-After);
    `max_body_bytes` the request body (413); `max_tokens_limit` the output length any request may
    ask for, on top of the model's context (400). With `api_key`, every `/v1` route needs it.
    """
    worker_box: list[EngineWorker] = []
    metrics = Metrics(lambda: worker_box[0].stats if worker_box else {})
    worker = EngineWorker(engine, max_queue=max_queue, metrics=metrics)
    worker_box.append(worker)
    ctx = ServerContext(engine, worker, metrics, max_tokens_limit=max_tokens_limit, retry_after_s=retry_after_s)

    @asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="slimlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for a slimlm engine.")
    app.state.ctx = ctx
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for bad UTF-8
            message = "the request body could not be decoded; send UTF-8 JSON"
        return _error(status, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return _error(500, f"internal server error ({type(exc).__name__})")

    @app.get("/health")
    async def health():
        """200 while the engine thread runs; 503 once it has died (restart the server)."""
        if not worker.alive:
            return _error(503, "the engine thread is not running", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def _card() -> dict:
        return {"id": ctx.model_name, "object": "model", "created": now_s(), "owned_by": "slimlm",
                "max_model_len": ctx.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        ctx.check_model(model)
        return _card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(ctx, body, request)

    return app


GRACE_S = 5.0  # on shutdown, how long requests in flight may take to finish


def draining_server(app, grace_s: float = GRACE_S, **config):
    """A uvicorn server for `app` whose shutdown gives requests in flight `grace_s` to finish and then ends those
    still running with an in-band error ("the server is shutting down"; a stream gets it as its last event before
    [DONE]) just before uvicorn would cut their connections without a word."""
    import asyncio

    import uvicorn

    worker = app.state.ctx.worker

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            halt = asyncio.get_running_loop().call_later(max(grace_s - 0.5, 0.0), worker.halt)
            try:
                await super().shutdown(sockets)
            finally:
                halt.cancel()

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=grace_s, **config))


def serve(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", **limits) -> None:
    """Run the app under uvicorn until interrupted. The key falls back to $SLIMLM_API_KEY."""
    api_key = api_key or os.environ.get("SLIMLM_API_KEY") or None
    if api_key is None and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(engine, api_key=api_key, **limits)
    draining_server(app, host=host, port=port, log_level=log_level).run()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
