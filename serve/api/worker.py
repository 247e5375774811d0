"""The one thread that owns the engine, and the bridge between it and the asyncio handlers.

`LLMEngine.step()` is synchronous and not thread-safe, and a step takes milliseconds to seconds:
running it on the event loop would freeze every connection. So exactly one thread touches the
engine. Handlers never call it; they put commands ("add", "abort") on a thread-safe queue that the
thread drains before each step, and get results back on per-request asyncio queues through
`loop.call_soon_threadsafe` (asyncio queues are not thread-safe either).

The engine mutates its `CompletionOutput` objects in place on the next step, so what crosses the
thread boundary is a snapshot, never the engine's own objects.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import AsyncIterator

from slimlm.serve.engine.outputs import RequestOutput

from .metrics import Metrics

log = logging.getLogger("slimlm.serve.api")

ACCEPTED = "accepted"  # first item on a request's queue once the engine took it
NEWEST = "newest"  # on a request's queue in place of an unfinished output: read `Batch.newest[index]`


class QueueFull(Exception):
    """More requests in flight than the server admits; the client should retry later."""


class EngineError(Exception):
    """The engine failed (or the server stopped) while the request was in flight."""


class Batch:
    """The engine requests behind one HTTP request (one per prompt), read as one stream.

    Items on `queue` are `(index, item)` where item is ACCEPTED, an exception, or a
    RequestOutput snapshot. `abort()` is safe to call at any time and any number of times.
    """

    def __init__(self, worker: "EngineWorker", request_ids: list[str], loop: asyncio.AbstractEventLoop):
        self.worker, self.request_ids, self.loop = worker, request_ids, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.newest: dict[int, RequestOutput] = {}  # per prompt, the unfinished output its reader has not taken
        self.arrival = time.perf_counter()
        self.unfinished = set(range(len(request_ids)))
        self._early: list = []  # outputs read while waiting for acknowledgements, in order

    def offer(self, index: int, item) -> None:
        """Queue `item` (on the loop's thread). An unfinished output replaces the one its reader has not taken
        yet: outputs are cumulative, so a reader that fell behind (a stream whose client stopped reading) gets
        the newest, and what waits for it stays one output per prompt, not one per engine step."""
        if isinstance(item, RequestOutput) and not item.finished:
            if index not in self.newest:
                self.queue.put_nowait((index, NEWEST))
            self.newest[index] = item
        else:
            self.queue.put_nowait((index, item))

    async def _get(self) -> tuple[int, object]:
        index, item = await self.queue.get()
        return (index, self.newest.pop(index)) if item == NEWEST else (index, item)

    async def accepted(self) -> None:
        """Wait until the engine took every request; re-raise the first refusal (ValueError)."""
        waiting = set(self.unfinished)
        while waiting:
            index, item = await self._get()
            if isinstance(item, BaseException):
                raise item
            if item == ACCEPTED:
                waiting.discard(index)
            else:  # an output that raced ahead of the acknowledgement of a sibling
                self._early.append((index, item))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield `(prompt index, output)` until every request finished."""
        while self.unfinished:
            index, item = self._early.pop(0) if self._early else await self._get()
            if isinstance(item, BaseException):
                raise item
            if item == ACCEPTED:
                continue
            if item.finished:
                self.unfinished.discard(index)
            yield index, item

    def abort(self) -> None:
        for index in sorted(self.unfinished):
            self.worker.abort(self.request_ids[index])
        self.unfinished.clear()


class EngineWorker:
    """Steps the engine in a background thread while any request is unfinished, sleeps otherwise.

    `max_queue` bounds the engine requests in flight (waiting + running) so a burst cannot grow
    memory without limit; past it `submit` raises QueueFull and the server answers 429.
    """

    def __init__(self, engine, max_queue: int = 256, metrics: Metrics | None = None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight: set[str] = set()
        # Owned by the worker thread: request id -> (batch, index, first-token time or None).
        self._sinks: dict[str, list] = {}
        self.stats: dict = {}  # the engine's stats after the latest step (read by /metrics)
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._refresh_stats()
                self._thread = threading.Thread(target=self._run, name="slimlm-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout)

    def halt(self) -> None:
        """Stop without waiting: the engine thread ends every request in flight with "the server is shutting down"
        (a stream gets it in-band) and refuses new ones."""
        self._stopping = True
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    # -- called from the event loop --------------------------------------------------------------
    def submit(self, requests: list[tuple[str, list[int], object]]) -> Batch:
        """Queue `(request_id, prompt_token_ids, params)` for the engine, all or none."""
        self.start()
        with self._inflight_lock:
            if len(self._inflight) + len(requests) > self.max_queue:
                raise QueueFull(f"the server has {len(self._inflight)} requests in flight (limit "
                                f"{self.max_queue}); retry later")
            self._inflight.update(rid for rid, _, _ in requests)
        batch = Batch(self, [rid for rid, _, _ in requests], asyncio.get_running_loop())
        for index, (rid, ids, params) in enumerate(requests):
            self._commands.put(("add", rid, ids, params, batch, index))
        self._wake.set()
        return batch

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before draining: a command queued after this sets it again
            self._drain()
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # keep serving: fail what was in flight, not the server
                    log.exception("engine step failed")
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._fail_all(EngineError(f"the engine failed: {self.last_error}"))
                    outputs = []
                for out in outputs:
                    self._deliver(out)
                self._refresh_stats()
            else:
                self._refresh_stats()
                self._wake.wait()
        self._drain()
        self._fail_all(EngineError("the server is shutting down"))
        self._refresh_stats()

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, rid, ids, params, batch, index = command
                if self._stopping:
                    self._send(batch, index, EngineError("the server is shutting down"))
                    self._release(rid)
                    continue
                try:
                    self.engine.add_request(rid, ids, params)
                except Exception as exc:  # ValueError: the client's fault (400); other: ours
                    self._send(batch, index, exc)
                    self._release(rid)
                    continue
                # ..., first token's time, each completion's finish reason so far
                self._sinks[rid] = [batch, index, None, [None] * params.n, None]  # 4: the prompt's copied fields
                self._send(batch, index, ACCEPTED)
            else:
                rid = command[1]
                if (sink := self._sinks.pop(rid, None)) is not None:
                    self.engine.abort_request(rid)
                    self._release(rid)
                    if self.metrics:  # per completion, as at a normal end; those that had ended keep their reason
                        for reason in sink[3]:
                            self.metrics.finished.labels(reason or "abort").inc()

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:  # aborted by its client between the step's start and now
            return
        batch, index, first = sink[:3]
        sink[3] = [c.finish_reason for c in out.outputs]
        now = time.perf_counter()
        generated = max((len(c.token_ids) for c in out.outputs), default=0)
        if first is None and generated:
            sink[2] = first = now
            if self.metrics:
                self.metrics.ttft.observe(now - batch.arrival)
        if out.finished:
            del self._sinks[out.request_id]
            self._release(out.request_id)
            if self.metrics:
                self.metrics.e2e.observe(now - batch.arrival)
                if first is not None and generated > 1:
                    self.metrics.tpot.observe((now - first) / (generated - 1))
                for c in out.outputs:
                    self.metrics.finished.labels(c.finish_reason or "unknown").inc()
        snap = _snapshot(out, sink[4])
        sink[4] = (snap.prompt_token_ids, snap.prompt_logprobs, snap.prompt_top_logprobs)
        self._send(batch, index, snap)

    def _fail_all(self, exc: Exception) -> None:
        for rid, (batch, index, *_) in list(self._sinks.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
            self._send(batch, index, exc)
            self._release(rid)
        self._sinks.clear()

    def _send(self, batch: Batch, index: int, item) -> None:
        try:
            batch.loop.call_soon_threadsafe(batch.offer, index, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _release(self, rid: str) -> None:
        with self._inflight_lock:
            self._inflight.discard(rid)

    def _refresh_stats(self) -> None:
        try:
            stats = dict(self.engine.stats())
        except Exception:
            log.exception("engine.stats() failed")
            return
        stats["inflight"] = len(self._inflight)
        self.stats = stats


def _snapshot(out: RequestOutput, prompt: tuple | None = None) -> RequestOutput:
    """Copy the lists the engine keeps appending to, so the handler reads a stable state. The prompt's fields
    are whole by a request's first output (its prefill is done): `prompt`, the copies an earlier snapshot made
    of them, are shared instead of copying a long prompt again every step."""
    comps = [dataclasses.replace(
        c, token_ids=list(c.token_ids),
        logprobs=None if c.logprobs is None else list(c.logprobs),
        top_logprobs=None if c.top_logprobs is None else list(c.top_logprobs)) for c in out.outputs]
    ids, lps, tops = prompt or (list(out.prompt_token_ids),
                                None if out.prompt_logprobs is None else list(out.prompt_logprobs),
                                None if out.prompt_top_logprobs is None else list(out.prompt_top_logprobs))
    return dataclasses.replace(out, prompt_token_ids=ids, outputs=comps, prompt_logprobs=lps,
                               prompt_top_logprobs=tops, metrics=dict(out.metrics))
