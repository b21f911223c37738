"""OpenAI Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`; a
translator between the Responses wire format and the engine's ChatRequest and events (the
shared path is api/generation.py, the parser api/responses_parsing.py, the store
api/responses_store.py).

Output items are built from the run's events by one builder for both answers: a reasoning item
(its summary is the model's whole thinking), a message with one output_text part, function calls
and custom tool calls. Streamed, each item is its event sequence (output_item.added, its parts'
added / delta / done, output_item.done) between response.created / response.in_progress and
response.completed (or response.incomplete, response.failed), every event numbered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson
from falcon.asgi import SSEvent

from ..engine.chat import ChatRequest, Run, Usage
from ..engine.output.events import (
    Event,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)
from ..engine.output.prompt import Message
from ..errors import ApplianceError, NotFound, PromptTooLong
from ..logs import new_id
from .generation import Generate
from .responses_parsing import (
    ResponsesRequest,
    arguments_input,
    chat_request,
    parse_response,
    to_messages,
)
from .responses_store import ResponseStore
from .seal import Seal

KEEP_ALIVE = SSEvent(comment="keep-alive")


def usage_of(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
    }


class OutputItems:
    """A run's events as Responses output items, and the stream events that build them."""

    def __init__(self, parsed: ResponsesRequest, seal: Seal) -> None:
        self.parsed = parsed
        self.seal = seal
        self.items: list[dict[str, Any]] = []  # finished items, in order
        self.open: Optional[dict[str, Any]] = None
        self._text: list[str] = []
        self._index = -1

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        out = self.close_item()
        self._index += 1
        self.open = item
        self._text = []
        out.append(
            {"type": "response.output_item.added", "output_index": self._index, "item": item}
        )
        return out

    def _at(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": self._index}

    def feed(self, events: Sequence[Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ev in events:
            kind = self.open["type"] if self.open is not None else None
            if isinstance(ev, Text):
                if not ev.text:
                    continue
                if kind != "message":
                    out += self._start(
                        {
                            "id": "msg_" + new_id(),
                            "type": "message",
                            "role": "assistant",
                            "status": "in_progress",
                            "content": [],
                        }
                    )
                    out.append(
                        {
                            "type": "response.content_part.added",
                            **self._at(),
                            "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []},
                        }
                    )
                self._text.append(ev.text)
                out.append(
                    {
                        "type": "response.output_text.delta",
                        **self._at(),
                        "content_index": 0,
                        "delta": ev.text,
                        "logprobs": [],
                    }
                )
            elif isinstance(ev, Reasoning):
                if not ev.text:
                    continue
                if kind != "reasoning":
                    out += self._start({"id": "rs_" + new_id(), "type": "reasoning", "summary": []})
                    out.append(
                        {
                            "type": "response.reasoning_summary_part.added",
                            **self._at(),
                            "summary_index": 0,
                            "part": {"type": "summary_text", "text": ""},
                        }
                    )
                self._text.append(ev.text)
                out.append(
                    {
                        "type": "response.reasoning_summary_text.delta",
                        **self._at(),
                        "summary_index": 0,
                        "delta": ev.text,
                    }
                )
            elif isinstance(ev, ToolCallStart):
                if ev.name in self.parsed.custom_tools:
                    item = {
                        "id": "ctc_" + new_id(),
                        "type": "custom_tool_call",
                        "call_id": ev.id,
                        "name": ev.name,
                        "input": "",
                    }
                else:
                    item = {
                        "id": "fc_" + new_id(),
                        "type": "function_call",
                        "call_id": ev.id,
                        "name": ev.name,
                        "arguments": "",
                        "status": "in_progress",
                    }
                out += self._start(item)
            elif isinstance(ev, ToolCallArgs):
                if self.open is None or not ev.delta:
                    continue
                self._text.append(ev.delta)
                if self.open["type"] == "function_call":
                    out.append(
                        {
                            "type": "response.function_call_arguments.delta",
                            **self._at(),
                            "delta": ev.delta,
                        }
                    )
            elif isinstance(ev, ToolCallEnd):
                out += self.close_item()
        return out

    def close_item(self, status: str = "completed") -> list[dict[str, Any]]:
        """End the open item: its done events, and the finished item."""
        item, self.open = self.open, None
        if item is None:
            return []
        text = "".join(self._text)
        at = {"item_id": item["id"], "output_index": self._index}
        out: list[dict[str, Any]] = []
        kind = item["type"]
        if kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(
                {
                    "type": "response.output_text.done",
                    **at,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            out.append(
                {"type": "response.content_part.done", **at, "content_index": 0, "part": part}
            )
            item = {**item, "status": status, "content": [part]}
        elif kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            out.append(
                {
                    "type": "response.reasoning_summary_text.done",
                    **at,
                    "summary_index": 0,
                    "text": text,
                }
            )
            out.append(
                {
                    "type": "response.reasoning_summary_part.done",
                    **at,
                    "summary_index": 0,
                    "part": part,
                }
            )
            item = {**item, "summary": [part]}
            if self.parsed.include_encrypted:
                item["encrypted_content"] = self.seal.seal(text)
        elif kind == "function_call":
            out.append(
                {
                    "type": "response.function_call_arguments.done",
                    **at,
                    "name": item["name"],
                    "arguments": text or "{}",
                }
            )
            item = {**item, "arguments": text or "{}", "status": "completed"}
        else:  # custom_tool_call: its input is known once its arguments are complete
            value = arguments_input(text)
            out.append({"type": "response.custom_tool_call_input.delta", **at, "delta": value})
            out.append({"type": "response.custom_tool_call_input.done", **at, "input": value})
            item = {**item, "input": value}
        out.append({"type": "response.output_item.done", "output_index": self._index, "item": item})
        self.items.append(item)
        return out


def _drop_oldest(messages: tuple[Message, ...]) -> Optional[tuple[Message, ...]]:
    """The conversation without its oldest turn (truncation: auto), or None when only the
    system prompt and the last user turn are left."""
    first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
    if first is None:
        return None
    end = next((i for i in range(first + 1, len(messages)) if messages[i].role == "user"), None)
    if end is None:
        return None
    return messages[:first] + messages[end:]


class Responses:
    """POST /v1/responses."""

    def __init__(self, gen: Generate, store: ResponseStore, seal: Seal) -> None:
        self.g = gen
        self.store = store
        self.seal = seal

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        parsed = parse_response(await self.g.read(req), self.seal.open)
        prior: tuple[dict[str, Any], ...] = ()
        if parsed.previous_response_id is not None:
            stored = self.store.get(parsed.previous_response_id)
            if stored is None:
                raise NotFound(
                    f"response {parsed.previous_response_id!r} is not stored here (unknown, "
                    "deleted, dropped from the bounded store, or from before a restart); send "
                    "the whole input instead",
                    param="previous_response_id",
                )
            prior = stored.items
        conversation = prior + parsed.items
        messages = to_messages(
            conversation, instructions=parsed.instructions, open_sealed=self.seal.open
        )
        run = await self._start(req, chat_request(parsed, messages), parsed.truncation_auto)
        rid = "resp_" + new_id()
        created = int(time.time())
        items = OutputItems(parsed, self.seal)
        if not parsed.stream:

            def sink(events: Sequence[Event]) -> None:
                items.feed(events)

            await self.g.collect(run, req, sink=sink)
            items.close_item("incomplete" if run.finish == "length" else "completed")
            body = self._response(parsed, rid, created, run, items.items)
            self._keep(parsed, body, conversation, items.items)
            resp.content_type = falcon.MEDIA_JSON
            resp.data = orjson.dumps(body)
            return
        seq = [0]

        def numbered(payload: dict[str, Any]) -> SSEvent:
            payload["sequence_number"] = seq[0]
            seq[0] += 1
            return SSEvent(event=payload["type"], data=orjson.dumps(payload))

        def failed(exc: ApplianceError) -> SSEvent:
            body = self._base(parsed, rid, created, "failed", items.items)
            body["error"] = {"code": exc.code or "server_error", "message": exc.message}
            return numbered({"type": "response.failed", "response": body})

        resp.sse = self.g.stream(
            run, self._events(parsed, run, rid, created, items, conversation, numbered), failed
        )

    async def _start(self, req: falcon.asgi.Request, request: ChatRequest, truncate: bool) -> Run:
        while True:
            try:
                return await self.g.start(req, request)
            except PromptTooLong:
                shorter = _drop_oldest(request.messages) if truncate else None
                if shorter is None:
                    raise
                request = replace(request, messages=shorter)

    async def _events(
        self,
        parsed: ResponsesRequest,
        run: Run,
        rid: str,
        created: int,
        items: OutputItems,
        conversation: tuple[dict[str, Any], ...],
        numbered: Any,
    ) -> AsyncIterator[SSEvent]:
        snapshot = self._base(parsed, rid, created, "in_progress", [])
        yield numbered({"type": "response.created", "response": snapshot})
        yield numbered({"type": "response.in_progress", "response": snapshot})
        async for step in run.steps():
            if step is None:
                yield KEEP_ALIVE
                continue
            for payload in items.feed(step.events):
                yield numbered(payload)
        status = "incomplete" if run.finish == "length" else "completed"
        for payload in items.close_item(status):
            yield numbered(payload)
        body = self._response(parsed, rid, created, run, items.items)
        self._keep(parsed, body, conversation, items.items)
        yield numbered({"type": f"response.{body['status']}", "response": body})

    def _base(
        self,
        parsed: ResponsesRequest,
        rid: str,
        created: int,
        status: str,
        output: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "model": parsed.model,
            "output": list(output),
            "usage": None,
            **parsed.echo,
        }

    def _response(
        self,
        parsed: ResponsesRequest,
        rid: str,
        created: int,
        run: Run,
        output: list[dict[str, Any]],
    ) -> dict[str, Any]:
        incomplete = run.finish == "length"
        body = self._base(parsed, rid, created, "incomplete" if incomplete else "completed", output)
        if incomplete:
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            body["completed_at"] = int(time.time())
        body["usage"] = usage_of(run.usage())
        return body

    def _keep(
        self,
        parsed: ResponsesRequest,
        body: dict[str, Any],
        conversation: tuple[dict[str, Any], ...],
        output: list[dict[str, Any]],
    ) -> None:
        if parsed.store:
            self.store.put(body, conversation, tuple(output))


class ResponseById:
    """GET and DELETE /v1/responses/{response_id}: a stored response."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store

    def _missing(self, rid: str) -> NotFound:
        return NotFound(
            f"response {rid!r} is not stored here (unknown, deleted, dropped from the bounded "
            "store, stored with store: false, or from before a restart)",
            param="response_id",
        )

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        stored = self.store.get(response_id)
        if stored is None:
            raise self._missing(response_id)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(stored.response)

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, response_id: str
    ) -> None:
        if not self.store.delete(response_id):
            raise self._missing(response_id)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})
