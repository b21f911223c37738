"""OpenAI chat completions, completions and models: translators between the OpenAI wire format
and the engine's ChatRequest and events (see api/generation.py for the shared path)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson
from falcon.asgi import SSEvent

from ..engine.chat import Run, Usage
from ..engine.output.events import Reasoning, Text, ToolCallArgs, ToolCallStart
from ..engine.service import Engine
from ..engine.types import Generation
from ..errors import ApplianceError
from ..logs import new_id
from .errors import body_of
from .generation import Generate
from .parsing import parse_chat, parse_completion

DONE = SSEvent(data=b"[DONE]")
KEEP_ALIVE = SSEvent(comment="keep-alive")


def usage_of(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def error_event(exc: ApplianceError) -> SSEvent:
    return SSEvent(data=orjson.dumps(body_of(exc)))


def _token_text(tok: Any, t: int) -> str:
    return str(tok.decode([t]))


def _chat_logprobs(tok: Any, gen: Generation, start: int, count: int) -> dict[str, Any]:
    content = []
    for i in range(start, min(start + count, len(gen.logprobs))):
        s = _token_text(tok, gen.tokens[i])
        tops = gen.top_logprobs[i] if i < len(gen.top_logprobs) else []
        content.append(
            {
                "token": s,
                "logprob": gen.logprobs[i],
                "bytes": list(s.encode()),
                "top_logprobs": [
                    {
                        "token": (ts := _token_text(tok, x.token)),
                        "logprob": x.logprob,
                        "bytes": list(ts.encode()),
                    }
                    for x in tops
                ],
            }
        )
    return {"content": content}


def _completion_logprobs(
    tok: Any, gen: Generation, start: int, count: int, offset: int
) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for i in range(start, min(start + count, len(gen.logprobs))):
        s = _token_text(tok, gen.tokens[i])
        tokens.append(s)
        lps.append(gen.logprobs[i])
        offsets.append(pos)
        pos += len(s)
        t = gen.top_logprobs[i] if i < len(gen.top_logprobs) else []
        tops.append({_token_text(tok, x.token): x.logprob for x in t})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _json(resp: falcon.asgi.Response, data: Any) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(data)


class ChatCompletions:
    """POST /v1/chat/completions."""

    def __init__(self, gen: Generate) -> None:
        self.g = gen

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        parsed = parse_chat(await self.g.read(req))
        run = await self.g.start(req, parsed.request)
        rid = "chatcmpl-" + new_id()
        created = int(time.time())
        if not parsed.stream:
            answer = await self.g.collect(run, req)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": answer.text if answer.text or not answer.calls else None,
                "refusal": None,
            }
            if answer.reasoning:
                message["reasoning_content"] = message["reasoning"] = answer.reasoning
            finish = run.finish
            if answer.calls and parsed.legacy_functions:
                _, name, args = answer.calls[0]
                message["function_call"] = {"name": name, "arguments": args}
                finish = "function_call" if finish == "tool_calls" else finish
            elif answer.calls:
                message["tool_calls"] = [
                    {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                    for cid, name, args in answer.calls
                ]
            tok, gen = run.tokenizer, run.gen
            logprobs = (
                _chat_logprobs(tok, gen, 0, run.answer_tokens) if (gen.params.logprobs) else None
            )
            _json(
                resp,
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": run.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": logprobs,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage_of(run.usage()),
                },
            )
            return
        resp.sse = self.g.stream(
            run,
            self._chunks(run, rid, created, parsed.include_usage, parsed.legacy_functions),
            error_event,
            DONE,
        )

    async def _chunks(
        self, run: Run, rid: str, created: int, include_usage: bool, legacy: bool = False
    ) -> AsyncIterator[SSEvent]:
        head = orjson.dumps(
            {"id": rid, "object": "chat.completion.chunk", "created": created, "model": run.model}
        )[:-1]
        # Built once per request: a text chunk is prefix + JSON string + suffix.
        prefix = head + b',"choices":[{"index":0,"delta":{"content":'
        suffix = b'},"logprobs":null,"finish_reason":null}]}'
        tok, gen = run.tokenizer, run.gen
        want_lp = gen.params.logprobs

        def chunk(delta: dict[str, Any], lp: Optional[dict[str, Any]] = None) -> SSEvent:
            return SSEvent(
                data=head
                + b',"choices":['
                + orjson.dumps({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None})
                + b"]}"
            )

        yield SSEvent(
            data=head + b',"choices":[{"index":0,"delta":{"role":"assistant",'
            b'"content":""},"logprobs":null,"finish_reason":null}]}'
        )
        async for step in run.steps():
            if step is None:
                yield KEEP_ALIVE
                continue
            lp = _chat_logprobs(tok, gen, step.start, step.count) if want_lp else None
            if not step.events and lp is not None:
                yield chunk({"content": ""}, lp)
            for ev in step.events:
                if isinstance(ev, Text):
                    if lp is None:
                        yield SSEvent(data=prefix + orjson.dumps(ev.text) + suffix)
                    else:
                        yield chunk({"content": ev.text}, lp)
                elif isinstance(ev, Reasoning):
                    yield chunk({"reasoning_content": ev.text, "reasoning": ev.text}, lp)
                elif legacy and isinstance(ev, ToolCallStart):
                    if ev.index:
                        continue  # the deprecated form has one call
                    yield chunk({"function_call": {"name": ev.name, "arguments": ""}}, lp)
                elif legacy and isinstance(ev, ToolCallArgs):
                    if ev.index:
                        continue
                    yield chunk({"function_call": {"arguments": ev.delta}}, lp)
                elif isinstance(ev, ToolCallStart):
                    yield chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": ev.index,
                                    "id": ev.id,
                                    "type": "function",
                                    "function": {"name": ev.name, "arguments": ""},
                                }
                            ]
                        },
                        lp,
                    )
                elif isinstance(ev, ToolCallArgs):
                    yield chunk(
                        {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.delta}}]},
                        lp,
                    )
                else:
                    continue
                lp = None  # a step's logprobs go with its first chunk
        finish = run.finish
        if legacy and finish == "tool_calls":
            finish = "function_call"
        yield SSEvent(
            data=head + b',"choices":[{"index":0,"delta":{},"logprobs":null,'
            b'"finish_reason":' + orjson.dumps(finish) + b"}]}"
        )
        if include_usage:
            yield SSEvent(
                data=head + b',"choices":[],"usage":' + orjson.dumps(usage_of(run.usage())) + b"}"
            )


class Completions:
    """POST /v1/completions."""

    def __init__(self, gen: Generate) -> None:
        self.g = gen

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        parsed = parse_completion(await self.g.read(req))
        run = await self.g.start(req, parsed.request)
        p = parsed.request.prompt
        tok, gen = run.tokenizer, run.gen
        echo = ""
        if parsed.echo:
            echo = p if isinstance(p, str) else str(tok.decode(list(p or ())))
        rid = "cmpl-" + new_id()
        created = int(time.time())
        if not parsed.stream:
            answer = await self.g.collect(run, req)
            lp = (
                _completion_logprobs(tok, gen, 0, run.answer_tokens, len(echo))
                if (gen.params.logprobs)
                else None
            )
            _json(
                resp,
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": run.model,
                    "choices": [
                        {
                            "index": 0,
                            "text": echo + answer.text,
                            "finish_reason": run.finish,
                            "logprobs": lp,
                        }
                    ],
                    "usage": usage_of(run.usage()),
                },
            )
            return
        resp.sse = self.g.stream(
            run, self._chunks(run, rid, created, echo, parsed.include_usage), error_event, DONE
        )

    async def _chunks(
        self, run: Run, rid: str, created: int, echo: str, include_usage: bool
    ) -> AsyncIterator[SSEvent]:
        head = orjson.dumps(
            {"id": rid, "object": "text_completion", "created": created, "model": run.model}
        )[:-1]
        prefix = head + b',"choices":[{"index":0,"text":'
        suffix = b',"logprobs":null,"finish_reason":null}]}'
        tok, gen = run.tokenizer, run.gen
        want_lp = gen.params.logprobs
        at = len(echo)  # where the next token's text starts: text_offset counts from the start
        if echo:
            yield SSEvent(data=prefix + orjson.dumps(echo) + suffix)
        async for step in run.steps():
            if step is None:
                yield KEEP_ALIVE
                continue
            text = "".join(ev.text for ev in step.events if isinstance(ev, Text))
            if want_lp:
                lp_obj = _completion_logprobs(tok, gen, step.start, step.count, at)
                at += sum(len(t) for t in lp_obj["tokens"])
                yield SSEvent(
                    data=prefix
                    + orjson.dumps(text)
                    + b',"logprobs":'
                    + orjson.dumps(lp_obj)
                    + b',"finish_reason":null}]}'
                )
            elif text:
                yield SSEvent(data=prefix + orjson.dumps(text) + suffix)
        yield SSEvent(
            data=prefix + b'"","logprobs":null,"finish_reason":' + orjson.dumps(run.finish) + b"}]}"
        )
        if include_usage:
            yield SSEvent(
                data=head + b',"choices":[],"usage":' + orjson.dumps(usage_of(run.usage())) + b"}"
            )


class Models:
    """GET /v1/models: every catalog model (loaded on first use), with the aliases that lead to
    it; each exact alias is listed as a model of its own too (`alias_of` names the target), so
    a client that checks its model name against the list finds it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.created = int(time.time())

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        loaded = set(self.engine.registry.loaded())
        aliases = self.engine.models_cfg.aliases
        names = self.engine.registry.names

        def entry(n: str, target: str) -> dict[str, Any]:
            d: dict[str, Any] = {
                "id": n,
                "object": "model",
                "created": self.created,
                "owned_by": "appliance",
                "loaded": target in loaded,
            }
            if n == target:
                d["aliases"] = [a for a, t in aliases.items() if t == n]
            else:
                d["alias_of"] = target
            return d

        data = [entry(n, n) for n in names]
        data += [
            entry(a, t)
            for a, t in aliases.items()
            if a not in names and not any(c in a for c in "*?[")
        ]
        _json(resp, {"object": "list", "data": data})
