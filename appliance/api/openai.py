"""OpenAI-compatible resources: thin (parse -> engine -> serialize)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson
from falcon.asgi import SSEvent

from ..engine.service import Engine
from ..engine.text import TextStream
from ..engine.types import Generation
from ..errors import ApplianceError, BodyTooLarge, ClientGone, Forbidden, RequestTimeout
from ..lifecycle import Lifecycle
from ..logs import new_id
from .errors import body_of
from .parsing import Common, check_vocab, decode_json, parse_chat, parse_completion

log = logging.getLogger("appliance.api")


async def read_json(req: falcon.asgi.Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past max_bytes without reading the rest."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge(f"the body is {length} bytes; the limit is {max_bytes}")
    chunks = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return decode_json(b"".join(chunks))


def _answer_len(gen: Generation, out: Optional[_Out]) -> int:
    """Tokens of the answer: up to the one that completed a stop string, when one did (tokens
    generated after it in the same step are not part of it)."""
    if out is not None and out.text.stopped:
        return min(len(gen.tokens), out.text.used)
    return len(gen.tokens)


def _usage(gen: Generation, out: Optional[_Out] = None) -> dict[str, Any]:
    p, c = len(gen.prompt_tokens), _answer_len(gen, out)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


class _Out:
    """Text and finish reason of one request, as the client sees them."""

    __slots__ = ("text", "finish")

    def __init__(self, text: TextStream) -> None:
        self.text = text
        self.finish: Optional[str] = None


class Generate:
    """The shared path of /v1/chat/completions and /v1/completions."""

    def __init__(self, engine: Engine, lifecycle: Lifecycle, max_body_bytes: int) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes

    async def begin(
        self,
        req: falcon.asgi.Request,
        common: Common,
        prompt_of: Callable[[Any], list[int]],
        raw_prompt: Any,
    ) -> tuple[Generation, Any]:
        """Template, check and admit a parsed request. From here until it is submitted (or
        refused) it counts as on its way to an engine, which may wait for it (arrivals.py)."""
        arrivals = self.engine.arrivals
        arrivals.on_the_way(req.scope)
        try:
            gen, tok = await self._begin(req, common, prompt_of, raw_prompt)
            req.context.generation = gen  # the access log's token counts
            return gen, tok
        finally:
            arrivals.admitting(req.scope)  # normally done already, just before the submit

    async def _begin(
        self,
        req: falcon.asgi.Request,
        common: Common,
        prompt_of: Callable[[Any], list[int]],
        raw_prompt: Any,
    ) -> tuple[Generation, Any]:
        self.lifecycle.check()
        if common.high_priority and not getattr(req.context, "is_admin", False):
            raise Forbidden("priority 'high' needs the admin key", param="priority")
        name = self.engine.resolve_name(common.model)
        req.context.model = name
        if self.engine.registry.worker(name) is None:
            # It waits for a load (seconds): not a request the running batches should wait for.
            self.engine.arrivals.admitting(req.scope)
        worker = await self.engine.model(name)
        tok = worker.tokenizer
        check_vocab(common.params, raw_prompt, worker.vocab_size)
        try:
            prompt = prompt_of(tok)
        except ApplianceError:
            raise
        except Exception as exc:
            from ..errors import InvalidRequest

            raise InvalidRequest(
                f"the prompt could not be built: {exc}", param="messages"
            ) from None
        # raw_prompt is the completions prompt; chat passes None.
        where = "messages" if raw_prompt is None else "prompt"
        self.engine.check_prompt(name, prompt, common.max_tokens or 1, param=where)
        max_tokens = self.engine.max_tokens_for(name, len(prompt), common.max_tokens)
        params = replace(common.params, max_tokens=max_tokens)
        start = self.engine.start(
            worker, prompt, params, high_priority=common.high_priority, scope=req.scope
        )
        if not self.engine.admission.would_wait():
            return await start, tok
        return await _unless_client_leaves(req, start, self.engine), tok

    async def collect(
        self, gen: Generation, out: _Out, req: Optional[falcon.asgi.Request] = None
    ) -> str:
        """Run a request to the end; returns its text. A client that goes away meanwhile ends it
        (its slot is freed at once, not when the answer would have been complete)."""
        deadline = self.engine.deadline()
        parts = []
        watcher = _watch_disconnect(req, lambda: self.engine.finish(gen, status="cancelled"))
        try:
            while True:
                new, _ = await gen.next_tokens(deadline)
                if not new:
                    break
                parts.append(out.text.feed(new))
                if out.text.stopped:
                    out.finish = "stop"
                    break
            parts.append(out.text.flush())
            out.finish = out.finish or gen.finish_reason or "stop"
            self.engine.finish(gen)
        except BaseException as exc:
            self.engine.finish(gen, status=_status_name(exc))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        return "".join(parts)

    def sse(self, gen: Generation, *args: Any) -> AsyncIterator[Optional[SSEvent]]:
        """The stream's events. Should Falcon never iterate them (a response middleware that
        raises after the responder), the slot is still freed when the generator is dropped."""
        events = self.events(gen, *args)
        weakref.finalize(events, self.engine.finish, gen, "cancelled")
        return events

    async def events(
        self,
        gen: Generation,
        out: _Out,
        piece: Callable[[str, int, int], bytes],
        final: Callable[[str], bytes],
        usage: Optional[Callable[[], bytes]],
        first: Optional[bytes] = None,
    ) -> AsyncIterator[Optional[SSEvent]]:
        """SSE events of one stream; the slot is freed in `finally` whatever happens."""
        status = "ok"
        try:
            if first is not None:
                yield SSEvent(data=first)
            deadline = self.engine.deadline()
            while True:
                if not await gen.wait_event():
                    if asyncio.get_running_loop().time() > deadline:
                        raise RequestTimeout("the request ran past limits.request_timeout_s")
                    yield SSEvent(comment="keep-alive")
                    continue
                new, start = await gen.next_tokens(deadline)
                if not new:
                    break
                text = out.text.feed(new)
                if text or gen.params.logprobs:
                    # Past a stop string's last token, the tokens are not part of the answer.
                    count = out.text.used - start if out.text.stopped else len(new)
                    yield SSEvent(data=piece(text, start, count))
                if out.text.stopped:
                    out.finish = "stop"
                    break
            tail = out.text.flush()
            if tail:
                yield SSEvent(data=piece(tail, len(gen.tokens), 0))
            out.finish = out.finish or gen.finish_reason or "stop"
            self.engine.finish(gen)
            yield SSEvent(data=final(out.finish))
            if usage is not None:
                yield SSEvent(data=usage())
        except ApplianceError as exc:
            status = _status_name(exc)
            yield SSEvent(data=orjson.dumps(body_of(exc)))
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # never a hang: an error chunk, then [DONE]
            status = "error"
            log.exception("stream failed")
            yield SSEvent(
                data=orjson.dumps(
                    {
                        "error": {
                            "message": f"generation failed: {exc}",
                            "type": "server_error",
                            "param": None,
                            "code": "engine_failure",
                        }
                    }
                )
            )
        finally:
            self.engine.finish(gen, status=status)
        yield SSEvent(data=b"[DONE]")


async def _unless_client_leaves(
    req: falcon.asgi.Request, start: Coroutine[Any, Any, Generation], engine: Engine
) -> Generation:
    """Wait in the admission queue, but give the place up if the client goes away meanwhile
    (uvicorn does not cancel the handler; only the next receive() tells)."""
    task = asyncio.ensure_future(start)
    gone: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def left() -> None:
        if not gone.done():
            gone.set_result(None)

    watcher = _watch_disconnect(req, left)
    if watcher is None:
        return await task
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not gone.done():
        gone.cancel()
        return task.result()  # admitted, or QueueFull after queue_timeout_s
    if not task.done():
        task.cancel()  # Admission.acquire leaves the queue, or passes on a slot just handed over
        await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None:
        engine.finish(task.result(), status="cancelled")  # admitted as the client left
    raise ClientGone("the client went away while its request waited for a slot")


def _watch_disconnect(
    req: Optional[falcon.asgi.Request], on_disconnect: Callable[[], None]
) -> Optional[asyncio.Task[None]]:
    """Call `on_disconnect` when the client goes away before the answer is sent.

    uvicorn neither cancels the handler nor tells Falcon, and Falcon has no public hook for it:
    once the body is read, the next ASGI receive() is the `http.disconnect` message.
    """
    receive = getattr(req, "_receive", None)
    if receive is None:
        return None

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                on_disconnect()
                return

    return asyncio.ensure_future(watch())


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, ApplianceError):
        return exc.code or "error"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "error"


def _token_text(tok: Any, t: int) -> str:
    return str(tok.decode([t]))


def _chat_logprobs(tok: Any, gen: Generation, start: int, count: int) -> dict[str, Any]:
    content = []
    for i in range(start, min(start + count, len(gen.logprobs))):
        t = gen.tokens[i]
        s = _token_text(tok, t)
        entry: dict[str, Any] = {"token": s, "logprob": gen.logprobs[i], "bytes": list(s.encode())}
        tops = gen.top_logprobs[i] if i < len(gen.top_logprobs) else []
        entry["top_logprobs"] = [
            {
                "token": (ts := _token_text(tok, x.token)),
                "logprob": x.logprob,
                "bytes": list(ts.encode()),
            }
            for x in tops
        ]
        content.append(entry)
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


class ChatCompletions:
    """POST /v1/chat/completions."""

    def __init__(self, gen: Generate) -> None:
        self.g = gen

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, self.g.max_body_bytes)
        parsed = parse_chat(body)
        common = parsed.common
        msgs = [dict(m) for m in parsed.messages]
        gen, tok = await self.g.begin(
            req,
            common,
            lambda t: list(t.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)),
            None,
        )
        out = _Out(TextStream(tok, common.params.stop))
        rid = "chatcmpl-" + new_id()
        created = int(time.time())
        model = gen.model
        if not common.stream:
            text = await self.g.collect(gen, out, req)
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(tok, gen, 0, _answer_len(gen, out))
                if common.params.logprobs
                else None,
                "finish_reason": out.finish,
            }
            resp.content_type = falcon.MEDIA_JSON
            resp.data = orjson.dumps(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(gen, out),
                }
            )
            return
        head = orjson.dumps(
            {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1]
        # Built once per request: each token chunk is prefix + JSON string + suffix.
        prefix = head + b',"choices":[{"index":0,"delta":{"content":'
        suffix = b'},"logprobs":null,"finish_reason":null}]}'
        want_lp = common.params.logprobs

        def piece(text: str, start: int, count: int) -> bytes:
            if want_lp:
                lp = orjson.dumps(_chat_logprobs(tok, gen, start, count))
                return (
                    prefix
                    + orjson.dumps(text)
                    + b'},"logprobs":'
                    + lp
                    + b',"finish_reason":null}]}'
                )
            return prefix + orjson.dumps(text) + suffix

        def final(reason: str) -> bytes:
            return (
                head
                + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
                + orjson.dumps(reason)
                + b"}]}"
            )

        def usage() -> bytes:
            return head + b',"choices":[],"usage":' + orjson.dumps(_usage(gen, out)) + b"}"

        first = (
            head
            + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]}'
        )
        resp.sse = self.g.sse(
            gen, out, piece, final, usage if common.include_usage else None, first
        )


class Completions:
    """POST /v1/completions."""

    def __init__(self, gen: Generate) -> None:
        self.g = gen

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, self.g.max_body_bytes)
        parsed = parse_completion(body)
        common = parsed.common
        p = parsed.prompt

        def prompt_of(tok: Any) -> list[int]:
            if isinstance(p, tuple):
                return list(p)
            bos = getattr(tok, "bos_token", None)
            add_special = bos is None or not p.startswith(bos)
            return list(tok.encode(p, add_special_tokens=add_special))

        gen, tok = await self.g.begin(req, common, prompt_of, p)
        out = _Out(TextStream(tok, common.params.stop))
        rid = "cmpl-" + new_id()
        created = int(time.time())
        model = gen.model
        echo = ""
        if parsed.echo:
            echo = p if isinstance(p, str) else str(tok.decode(list(p)))
        if not common.stream:
            text = echo + await self.g.collect(gen, out, req)
            resp.content_type = falcon.MEDIA_JSON
            resp.data = orjson.dumps(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "text": text,
                            "finish_reason": out.finish,
                            "logprobs": _completion_logprobs(
                                tok, gen, 0, _answer_len(gen, out), len(echo)
                            )
                            if common.params.logprobs
                            else None,
                        }
                    ],
                    "usage": _usage(gen, out),
                }
            )
            return
        head = orjson.dumps(
            {"id": rid, "object": "text_completion", "created": created, "model": model}
        )[:-1]
        prefix = head + b',"choices":[{"index":0,"text":'
        suffix = b',"logprobs":null,"finish_reason":null}]}'
        want_lp = common.params.logprobs

        at = [len(echo)]  # where the next token's text starts: text_offset counts from the start

        def piece(text: str, start: int, count: int) -> bytes:
            if want_lp:
                lp_obj = _completion_logprobs(tok, gen, start, count, at[0])
                at[0] += sum(len(t) for t in lp_obj["tokens"])
                lp = orjson.dumps(lp_obj)
                return (
                    prefix + orjson.dumps(text) + b',"logprobs":' + lp + b',"finish_reason":null}]}'
                )
            return prefix + orjson.dumps(text) + suffix

        def final(reason: str) -> bytes:
            return prefix + b'"","logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}"

        def usage() -> bytes:
            return head + b',"choices":[],"usage":' + orjson.dumps(_usage(gen, out)) + b"}"

        first = prefix + orjson.dumps(echo) + suffix if echo else None
        resp.sse = self.g.sse(
            gen, out, piece, final, usage if common.include_usage else None, first
        )


class Models:
    """GET /v1/models: every catalog model (loaded on first use)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.created = int(time.time())

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        loaded = set(self.engine.registry.loaded())
        data = [
            {
                "id": n,
                "object": "model",
                "created": self.created,
                "owned_by": "appliance",
                "loaded": n in loaded,
            }
            for n in self.engine.registry.names
        ]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"object": "list", "data": data})
