"""Anthropic Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, a translator
between Anthropic's wire format and the engine's ChatRequest and events (the shared path is
api/generation.py; the parser api/anthropic_parsing.py; errors api/errors.py).

A streamed answer is Anthropic's event sequence: message_start; per content block
content_block_start, content_block_delta (text_delta, thinking_delta then signature_delta,
input_json_delta), content_block_stop; message_delta (stop reason, usage); message_stop.
`ping` is sent while the client would otherwise wait in silence, an `error` event on a failure.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson
from falcon.asgi import SSEvent

from ..engine.chat import Answer, Run, Usage
from ..engine.output.events import Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from ..engine.output.events import new_call_id as _new_call_id
from ..errors import ApplianceError
from ..logs import new_id
from .anthropic_parsing import AnthropicMessages, parse_messages
from .errors import anthropic_body_of
from .generation import Generate
from .seal import Seal

PING = SSEvent(event="ping", data=b'{"type":"ping"}')
tool_use_id = functools.partial(_new_call_id, "toolu_")


def usage_of(u: Usage) -> dict[str, Any]:
    """Anthropic's usage: input_tokens excludes the prompt tokens read from the cache."""
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def stop_reason(run: Run) -> tuple[str, Optional[str]]:
    """(stop_reason, stop_sequence) of a finished run."""
    if run.finish == "tool_calls":
        return "tool_use", None
    if run.finish == "length":
        return "max_tokens", None
    if run.stop_sequence is not None:
        return "stop_sequence", run.stop_sequence
    return "end_turn", None


def error_event(exc: ApplianceError) -> SSEvent:
    return SSEvent(event="error", data=orjson.dumps(anthropic_body_of(exc)))


def _input(arguments: str) -> Any:
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(name: str, data: dict[str, Any]) -> SSEvent:
    return SSEvent(event=name, data=orjson.dumps(data))


class Messages:
    """POST /v1/messages."""

    def __init__(self, gen: Generate, seal: Seal) -> None:
        self.g = gen
        self.seal = seal

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        parsed = parse_messages(await self.g.read(req))
        run = await self.g.start(req, parsed.request, id_factory=tool_use_id)
        mid = "msg_" + new_id()
        if not parsed.stream:
            answer = await self.g.collect(run, req)
            resp.content_type = falcon.MEDIA_JSON
            resp.data = orjson.dumps(self.message(parsed, run, mid, answer))
            return
        resp.sse = self.g.stream(run, self._events(parsed, run, mid), error_event)

    def _thinking_block(self, parsed: AnthropicMessages, text: str) -> dict[str, Any]:
        shown = "" if parsed.thinking_omitted else text
        return {"type": "thinking", "thinking": shown, "signature": self.seal.sign(text)}

    def message(
        self, parsed: AnthropicMessages, run: Run, mid: str, answer: Answer
    ) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if parsed.thinking and answer.reasoning:
            content.append(self._thinking_block(parsed, answer.reasoning))
        if answer.text:
            content.append({"type": "text", "text": answer.text})
        for cid, name, args in answer.calls:
            content.append({"type": "tool_use", "id": cid, "name": name, "input": _input(args)})
        reason, seq = stop_reason(run)
        return {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": parsed.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": usage_of(run.usage()),
        }

    async def _events(
        self, parsed: AnthropicMessages, run: Run, mid: str
    ) -> AsyncIterator[SSEvent]:
        prompt = len(run.gen.prompt_tokens)
        yield _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": parsed.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": prompt,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 0,
                    },
                },
            },
        )
        index = -1
        kind: Optional[str] = None  # the open block's type
        thought: list[str] = []

        def stop() -> list[SSEvent]:
            nonlocal kind
            out = []
            if kind == "thinking":
                sig = self.seal.sign("".join(thought))
                out.append(
                    _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "signature_delta", "signature": sig},
                        },
                    )
                )
                thought.clear()
            if kind is not None:
                out.append(
                    _event("content_block_stop", {"type": "content_block_stop", "index": index})
                )
            kind = None
            return out

        def start(block: dict[str, Any]) -> list[SSEvent]:
            nonlocal index, kind
            out = stop()
            index += 1
            kind = block["type"]
            out.append(
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            )
            return out

        def delta(d: dict[str, Any]) -> SSEvent:
            return _event(
                "content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}
            )

        async for step in run.steps():
            if step is None:
                yield PING
                continue
            for ev in step.events:
                if isinstance(ev, Text):
                    if not ev.text:
                        continue
                    if kind != "text":
                        for e in start({"type": "text", "text": ""}):
                            yield e
                    yield delta({"type": "text_delta", "text": ev.text})
                elif isinstance(ev, Reasoning):
                    if not parsed.thinking or not ev.text:
                        continue
                    if kind != "thinking":
                        for e in start({"type": "thinking", "thinking": "", "signature": ""}):
                            yield e
                    thought.append(ev.text)
                    if not parsed.thinking_omitted:
                        yield delta({"type": "thinking_delta", "thinking": ev.text})
                elif isinstance(ev, ToolCallStart):
                    block = {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}
                    for e in start(block):
                        yield e
                elif isinstance(ev, ToolCallArgs):
                    if ev.delta:
                        yield delta({"type": "input_json_delta", "partial_json": ev.delta})
                elif isinstance(ev, ToolCallEnd):
                    for e in stop():
                        yield e
        for e in stop():
            yield e
        reason, seq = stop_reason(run)
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": seq},
                "usage": usage_of(run.usage()),
            },
        )
        yield _event("message_stop", {"type": "message_stop"})


class CountTokens:
    """POST /v1/messages/count_tokens: the prompt's tokens as the model would read them."""

    def __init__(self, gen: Generate) -> None:
        self.g = gen

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        parsed = parse_messages(await self.g.read(req), count=True)
        n = await self.g.count(req, parsed.request)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"input_tokens": n})
