"""`/v1/completions`: prompts in (text or token ids, one or many), OpenAI text completions out.

Each prompt becomes one engine request with `n` completions; choice `i * n + j` is completion `j`
of prompt `i`, as OpenAI numbers them. `echo` with `logprobs` also returns the prompt tokens'
logprobs (the first is null: nothing predicts it), which is what lm-eval's `local-completions`
scores log-likelihood tasks with; `echo` with `max_tokens: 0` returns only the prompt.
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .common import (SSE_DONE, EventStream, ServerContext, check_prompt, collect, finite, lead_bytes, make_params,
                     new_id, now_s, resolve_max_tokens, sse, stream_error, submit, usage)
from .protocol import APIError, CompletionRequest
from .worker import EngineError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


async def create_completion(ctx: ServerContext, body: CompletionRequest, request: Request) -> Response:
    """Validate, submit one engine request per prompt, then answer in full or as a stream."""
    ctx.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of other than n is not supported by this server", param="best_of")
    prompts = await run_in_threadpool(_prompts, ctx, body.prompt)
    if len(prompts) > ctx.worker.max_queue:
        raise APIError(400, f"{len(prompts)} prompts in one request; this server takes at most "
                            f"{ctx.worker.max_queue}", param="prompt")
    echo = bool(body.echo)
    prompt_only = echo and body.max_tokens == 0
    if body.max_tokens is not None and body.max_tokens < 1 and not prompt_only:
        raise APIError(400, f"max_tokens must be at least 1 (0 only together with echo), got "
                            f"{body.max_tokens}", param="max_tokens")
    k = body.logprobs
    cid = new_id("cmpl")
    requests = []
    for i, (_, ids) in enumerate(prompts):
        where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        check_prompt(ctx, ids, where)
        max_tokens = 1 if prompt_only else resolve_max_tokens(ctx, body.max_tokens, len(ids), DEFAULT_MAX_TOKENS)
        params = make_params(ctx, body, max_tokens, k, k if (echo and k is not None) else None)
        requests.append((f"{cid}-{i}", ids, params))
    batch = await submit(ctx, requests)
    view = _View(ctx, cid, prompts, n, echo, prompt_only, k)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(view.events(batch, include_usage))
    finals = await collect(batch, request)
    if finals is None:
        return Response(status_code=499)
    return JSONResponse(view.response([finals[i] for i in range(len(prompts))]))


def _prompts(ctx: ServerContext, prompt) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt, from any of the four shapes OpenAI accepts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty; send a string, a list of strings or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [(None, list(prompt))]
    if isinstance(prompt[0], str):
        return [(text, ctx.encode(text)) for text in prompt]
    return [(None, list(ids)) for ids in prompt]


class _View:
    """Turns engine outputs into OpenAI's completion objects and stream chunks."""

    def __init__(self, ctx: ServerContext, cid: str, prompts, n: int, echo: bool, prompt_only: bool, k):
        self.ctx, self.id, self.prompts, self.n = ctx, cid, prompts, n
        self.echo, self.prompt_only, self.k = echo, prompt_only, k
        self.created = now_s()

    def _prompt_text(self, i: int) -> str:
        text, ids = self.prompts[i]
        return text if text is not None else self.ctx.tokenizer.decode(ids)

    def _logprobs(self, ids, lps, tops, offset: int) -> tuple[dict, int]:
        """Completions-style logprobs, and where the text after them starts; `offset` is where the first token's
        text starts. A token's offset is that of the character its first byte belongs to (one that begins
        inside a character points at it), so offsets index the choice's text however tokens split it."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, tid in enumerate(ids):
            piece, raw = self.ctx.piece(tid), self.ctx.token_bytes(tid)
            lp = finite(lps[j]) if lps is not None and j < len(lps) else None
            top = None
            if lp is not None:
                # Highest first, so a text collision between ids keeps the larger value; the
                # chosen token is always listed (lm-eval compares it against the top one).
                top = {}
                for alt, value in (tops[j] if tops is not None and j < len(tops) and tops[j] else []):
                    top.setdefault(self.ctx.piece(alt), finite(value))
                top.setdefault(piece, lp)
            out["tokens"].append(piece)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(max(offset - (bool(raw) and (raw[0] & 0xC0) == 0x80), 0))
            offset += lead_bytes(raw)
        return out, offset

    def _prompt_logprobs(self, out) -> dict:
        return self._logprobs(out.prompt_token_ids, out.prompt_logprobs, out.prompt_top_logprobs, 0)[0]

    def _choice(self, i: int, out, comp) -> dict:
        prefix = self._prompt_text(i) if self.echo else ""
        if self.prompt_only:
            text, reason, logprobs = prefix, "length", None
            if self.k is not None:
                logprobs = self._prompt_logprobs(out)
        else:
            text, reason, logprobs = prefix + comp.text, comp.finish_reason, None
            if self.k is not None:
                gen = self._logprobs(comp.token_ids, comp.logprobs, comp.top_logprobs, len(prefix))[0]
                if self.echo:
                    head = self._prompt_logprobs(out)
                    gen = {key: head[key] + gen[key] for key in gen}
                logprobs = gen
        return {"index": i * self.n + comp.index, "text": text, "logprobs": logprobs,
                "finish_reason": reason}

    def response(self, finals: list) -> dict:
        choices, generated = [], 0
        for i, out in enumerate(finals):
            for comp in out.outputs:
                choices.append(self._choice(i, out, comp))
                generated += 0 if self.prompt_only else len(comp.token_ids)
        choices.sort(key=lambda c: c["index"])
        prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.ctx.model_name, "choices": choices, "usage": usage(prompt_tokens, generated)}

    def _chunk(self, choices: list, usage_block: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created,
                 "model": self.ctx.model_name, "choices": choices}
        if usage_block is not None or self.include_usage:  # OpenAI: null in every chunk before the last
            chunk["usage"] = usage_block
        return chunk

    include_usage = False

    async def events(self, batch, include_usage: bool):
        """Stream chunks: each carries the text (and logprobs) new since the previous one."""
        self.include_usage = include_usage
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        next_offset: dict[int, int] = {}  # text_offset of the next token's first character
        done: set[int] = set()
        generated = 0
        try:
            async for i, out in batch.outputs():
                for comp in out.outputs:
                    index = i * self.n + comp.index
                    if index in done:
                        continue
                    first = index not in sent_chars
                    prefix = self._prompt_text(i) if (self.echo and first) else ""
                    start_tok = sent_tokens.get(index, 0)
                    if self.prompt_only:
                        text, reason, new_ids = "", "length", []
                    else:
                        text = comp.text[sent_chars.get(index, 0):]
                        reason, new_ids = comp.finish_reason, comp.token_ids[start_tok:]
                    if not (prefix or text or new_ids or reason):
                        continue
                    logprobs = None
                    if self.k is not None:
                        # Offsets count from the start of the choice's whole text, echoed prompt included.
                        offset = next_offset.get(index, len(self._prompt_text(i)) if self.echo else 0)
                        logprobs, next_offset[index] = self._logprobs(new_ids, (comp.logprobs or [])[start_tok:],
                                                                      (comp.top_logprobs or [])[start_tok:], offset)
                        if self.echo and first:
                            head = self._prompt_logprobs(out)
                            logprobs = {key: head[key] + logprobs[key] for key in logprobs}
                    sent_chars[index] = sent_chars.get(index, 0) + len(text)
                    sent_tokens[index] = start_tok + len(new_ids)
                    if reason:
                        done.add(index)
                        generated += 0 if self.prompt_only else len(comp.token_ids)
                    yield sse(self._chunk([{"index": index, "text": prefix + text, "logprobs": logprobs,
                                            "finish_reason": reason}]))
            if include_usage:
                prompt_tokens = sum(len(ids) for _, ids in self.prompts)
                yield sse(self._chunk([], usage(prompt_tokens, generated)))
            yield SSE_DONE
        except EngineError as exc:
            yield stream_error(exc)
            yield SSE_DONE
        finally:
            batch.abort()
