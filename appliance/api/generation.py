"""What every generating front-end shares: from a parsed ChatRequest to a running `Run`
(drain gate, priority, model, prompt, admission), collecting an answer, and streaming it.

A front-end only translates its wire format: it parses its body into a ChatRequest, calls
`start`, and turns the run's events into its JSON or SSE events. Slots are freed whatever
happens: at the end of the run, when the client goes away, or when the stream is dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Optional

import falcon
import falcon.asgi
from falcon.asgi import SSEvent

from ..engine.chat import Answer, ChatRequest, Prepared, Run, prepare
from ..engine.output.events import Event, IdFactory, new_call_id
from ..engine.service import Engine
from ..engine.types import Generation
from ..errors import ApplianceError, BodyTooLarge, ClientGone, EngineFailure, Forbidden
from ..lifecycle import Lifecycle
from .fields import check_vocab, decode_json

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


class Generate:
    """The shared path of every generating endpoint."""

    # Prompts are rendered and tokenized on a thread of their own, not on the event loop
    prepare_off_loop = True

    def __init__(self, engine: Engine, lifecycle: Lifecycle, max_body_bytes: int) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.max_body_bytes = max_body_bytes
        self._preparer: Optional[ThreadPoolExecutor] = None

    async def _prepare(self, *args: Any, **kwargs: Any) -> Prepared:
        """`prepare` (render the chat template, tokenize, build the grammar) on the front's one
        preparing thread. On the event loop, an agent's turn (its whole conversation again, 20k
        tokens) held the loop for some 25-30 ms of a core, and every running stream's tokens
        with it: a gap in each stream at every arrival. One thread, so prompts are prepared one
        at a time and in turn, as they were on the loop: a tokenizer is not made to be changed
        by two threads at once. The tokenizer's own work lets go of the GIL, so the loop goes
        on streaming meanwhile."""
        call = functools.partial(prepare, *args, **kwargs)
        if not self.prepare_off_loop:
            return call()
        if self._preparer is None:
            self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._preparer, context.run, call)

    async def read(self, req: falcon.asgi.Request) -> dict[str, Any]:
        return await read_json(req, self.max_body_bytes)

    async def start(
        self,
        req: falcon.asgi.Request,
        request: ChatRequest,
        *,
        id_factory: IdFactory = new_call_id,
    ) -> Run:
        """Render, check and admit a parsed request; its run. From here until it is submitted
        (or refused) it counts as on its way to an engine, which may wait for it."""
        arrivals = self.engine.arrivals
        arrivals.on_the_way(req.scope)
        try:
            run = await self._start(req, request, id_factory)
            req.context.generation = run.gen  # the access log's token counts
            return run
        finally:
            arrivals.admitting(req.scope)  # normally done already, just before the submit

    async def _start(
        self, req: falcon.asgi.Request, request: ChatRequest, id_factory: IdFactory
    ) -> Run:
        self.lifecycle.check()
        engine = self.engine
        if request.high_priority and not getattr(req.context, "is_admin", False):
            raise Forbidden("priority 'high' needs the admin key", param="priority")
        name = engine.resolve_name(request.model)
        req.context.model = name
        if engine.registry.worker(name) is None:
            # It waits for a load (seconds): not a request the running batches should wait for.
            engine.arrivals.admitting(req.scope)
        worker = await engine.model(name)
        check_vocab(request.params.logit_bias, request.prompt, worker.vocab_size)
        spec = engine.registry.spec(name)
        prepared = await self._prepare(
            worker, request, spec.tool_parser, max_tokens=spec.max_tokens
        )
        where = request.messages_param
        engine.check_prompt(name, prepared.prompt, request.max_tokens or 1, param=where)
        max_tokens = engine.max_tokens_for(name, len(prepared.prompt), request.max_tokens)
        prepared.params = replace(prepared.params, max_tokens=max_tokens)
        start = engine.start(
            worker,
            prepared.prompt,
            prepared.params,
            high_priority=request.high_priority,
            scope=req.scope,
            prompt_param=where,
        )
        if engine.would_wait(name, len(prepared.prompt), max_tokens):
            gen = await _unless_client_leaves(req, start, engine)
        else:
            gen = await start
        return Run(
            gen,
            worker.tokenizer,
            prepared,
            deadline=engine.deadline(),
            id_factory=id_factory,
            on_end=lambda: engine.finish(gen),
        )

    async def count(self, req: falcon.asgi.Request, request: ChatRequest) -> int:
        """The prompt tokens of a parsed request, rendered as a generation would render it (the
        model is loaded on first use); nothing is generated, no slot is taken."""
        self.lifecycle.check()
        engine = self.engine
        name = engine.resolve_name(request.model)
        req.context.model = name
        worker = await engine.model(name)
        spec = engine.registry.spec(name)
        prepared = await self._prepare(worker, request, spec.tool_parser, constrain=False)
        return len(prepared.prompt)

    async def collect(
        self,
        run: Run,
        req: Optional[falcon.asgi.Request] = None,
        sink: Optional[Callable[[Sequence[Event]], None]] = None,
    ) -> Answer:
        """Run a request to the end; its whole answer (`sink`, if given, also sees each step's
        events). A client that goes away meanwhile ends it (its slot is freed at once, not
        when the answer would have been complete)."""
        engine, gen = self.engine, run.gen
        watcher = _watch_disconnect(req, lambda: engine.finish(gen, status="cancelled"))
        answer = Answer()
        try:
            async for step in run.steps():
                if step is not None:
                    answer.add(step.events)
                    if sink is not None:
                        sink(step.events)
            engine.finish(gen)
        except BaseException as exc:
            engine.finish(gen, status=status_name(exc))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        return answer

    def stream(
        self,
        run: Run,
        events: AsyncIterator[SSEvent],
        on_error: Callable[[ApplianceError], SSEvent],
        last: Optional[SSEvent] = None,
    ) -> AsyncIterator[SSEvent]:
        """The stream of a run: `events` (the front-end's translation of `run.steps()`), an
        error event on failure, then `last`. Should Falcon never iterate it (a response
        middleware that raises after the responder), the slot is freed when it is dropped."""
        out = self._stream(run, events, on_error, last)
        weakref.finalize(out, self.engine.finish, run.gen, "cancelled")
        return out

    async def _stream(
        self,
        run: Run,
        events: AsyncIterator[SSEvent],
        on_error: Callable[[ApplianceError], SSEvent],
        last: Optional[SSEvent],
    ) -> AsyncIterator[SSEvent]:
        status = "ok"
        try:
            async for ev in events:
                yield ev
        except ApplianceError as exc:
            status = status_name(exc)
            yield on_error(exc)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # never a hang: an error event, then the end
            status = "error"
            log.exception("stream failed")
            yield on_error(EngineFailure(f"generation failed: {exc}"))
        finally:
            self.engine.finish(run.gen, status=status)
        if last is not None:
            yield last


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


def status_name(exc: BaseException) -> str:
    if isinstance(exc, ApplianceError):
        return exc.code or "error"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "error"
