"""`/v1/chat/completions`: messages rendered by the tokenizer's own chat template.

The template is the model's contract for how a conversation looks (special tokens, roles, the
assistant header that `add_generation_prompt` appends), so the server never formats chats itself.
The rendered text already holds any BOS the template wants, hence no special tokens are added when
tokenizing it. A stream opens each choice with a `role` delta, as OpenAI's does.
"""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from slimlm.serve.sampling_params import MAX_LOGPROBS

from .common import (SSE_DONE, EventStream, ServerContext, check_prompt, collect, finite, make_params,
                     new_id, now_s, resolve_max_tokens, sse, stream_error, submit, usage)
from .protocol import APIError, ChatCompletionRequest
from .worker import EngineError

MAX_TOP_LOGPROBS = 20


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: Request) -> Response:
    """Render the conversation, submit it with `n` completions, answer in full or as a stream."""
    ctx.check_model(body.model)
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    for i, message in enumerate(body.messages):  # an earlier turn's calls would vanish from the rendered prompt
        if (message.model_extra or {}).get("tool_calls") or (message.model_extra or {}).get("function_call"):
            raise APIError(400, f"messages.{i} holds tool calls, which this server does not support (nor `tools`); "
                                "send the conversation as text", param=f"messages.{i}")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}",
                       param="top_logprobs")
    ids = await run_in_threadpool(_render, ctx, body)
    check_prompt(ctx, ids, "the rendered conversation", param="messages")
    if body.max_tokens is not None and body.max_tokens < 1:  # refused even where max_completion_tokens rules
        raise APIError(400, f"max_tokens must be at least 1, got {body.max_tokens}", param="max_tokens")
    requested, name = body.max_completion_tokens, "max_completion_tokens"
    if requested is None:
        requested, name = body.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(ctx, requested, len(ids), None, name)
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = make_params(ctx, body, max_tokens, k, None)
    cid = new_id("chatcmpl")
    batch = await submit(ctx, [(cid, ids, params)])
    view = _View(ctx, cid, len(ids), body.top_logprobs or 0)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(view.events(batch, include_usage))
    finals = await collect(batch, request)
    if finals is None:
        return Response(status_code=499)
    return JSONResponse(view.response(finals[0], bool(body.logprobs)))


ROLES = {"system", "developer", "user", "assistant", "tool"}  # OpenAI's


def _render(ctx: ServerContext, body: ChatCompletionRequest) -> list[int]:
    if not body.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")
    messages = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role is {m.role!r}; expected one of {', '.join(sorted(ROLES))}",
                           param=f"messages.{i}.role")
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    got = f"{part.type!r}" if part.type != "text" else "a text part without `text`"
                    raise APIError(400, f"messages[{i}]: only text content parts (with their `text`) are "
                                        f"supported, got {got}", param=f"messages.{i}.content")
                parts.append(part.text)
            content = "\n".join(parts)
        role = m.role
        if role == "developer" and "developer" not in str(getattr(ctx.tokenizer, "chat_template", None) or ""):
            role = "system"  # OpenAI's newer name for the system message, which most templates do not know
        message = {"role": role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    tok = ctx.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (role order, ...) speak for the client
        raise APIError(400, f"the chat template could not render these messages: {exc}",
                       param="messages") from exc
    return ctx.encode(text, add_special_tokens=False, param="messages")


class _View:
    """Turns engine outputs into OpenAI's chat.completion objects and chunks."""

    def __init__(self, ctx: ServerContext, cid: str, prompt_tokens: int, top: int):
        self.ctx, self.id, self.prompt_tokens, self.top = ctx, cid, prompt_tokens, top
        self.created = now_s()

    def _entry(self, tid: int, lp: float) -> dict:
        return {"token": self.ctx.piece(tid), "logprob": finite(lp), "bytes": list(self.ctx.token_bytes(tid))}

    def _logprobs(self, comp, start: int = 0) -> dict:
        content = []
        lps, tops = comp.logprobs or [], comp.top_logprobs or []
        for j in range(start, len(comp.token_ids)):
            tid = comp.token_ids[j]
            entry = self._entry(tid, lps[j] if j < len(lps) else None)
            alts = tops[j] if j < len(tops) and tops[j] else []
            entry["top_logprobs"] = [self._entry(a, v) for a, v in alts[:self.top]]
            content.append(entry)
        return {"content": content}

    def response(self, out, logprobs: bool) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c) if logprobs else None, "finish_reason": c.finish_reason}
                   for c in out.outputs]
        generated = sum(len(c.token_ids) for c in out.outputs)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.ctx.model_name, "choices": choices,
                "usage": usage(self.prompt_tokens, generated)}

    def _chunk(self, choices: list, usage_block: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.ctx.model_name, "choices": choices}
        if usage_block is not None or self.include_usage:  # OpenAI: null in every chunk before the last
            chunk["usage"] = usage_block
        return sse(chunk)

    include_usage = False

    async def events(self, batch, include_usage: bool):
        self.include_usage = include_usage
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        generated = 0
        try:
            async for _, out in batch.outputs():
                for comp in out.outputs:
                    index = comp.index
                    if index in done:
                        continue
                    if index not in sent_chars:
                        sent_chars[index] = sent_tokens[index] = 0
                        yield self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}])
                    text = comp.text[sent_chars[index]:]
                    start = sent_tokens[index]
                    reason = comp.finish_reason
                    if not (text or len(comp.token_ids) > start or reason):
                        continue
                    logprobs = self._logprobs(comp, start) if comp.logprobs is not None else None
                    sent_chars[index] += len(text)
                    sent_tokens[index] = len(comp.token_ids)
                    if reason:
                        done.add(index)
                        generated += len(comp.token_ids)
                    delta = {"content": text} if text else {}
                    yield self._chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": reason}])
            if include_usage:
                yield self._chunk([], usage(self.prompt_tokens, generated))
            yield SSE_DONE
        except EngineError as exc:
            yield stream_error(exc)
            yield SSE_DONE
        finally:
            batch.abort()
