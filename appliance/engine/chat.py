"""The one internal request every front-end makes, and the run that turns it into events.

    front-end (wire format) -> ChatRequest -> prepare() -> Prepared -> Run.steps() -> events

`ChatRequest` holds what every API can ask: messages (or a raw prompt), tools and tool choice,
a response format, sampling, stop strings, the reasoning switch. `prepare` renders it with the
model's chat template (tools included, or the fallback prompt), builds the grammar that makes
forced tool calls and schema-bound answers valid, and picks the output parser of the model's
family. `Run` reads the generated tokens, cuts stop strings, and yields the parser's events
(text, reasoning, tool-call start, argument fragments, end) step by step, then the finish
reason and the usage. A front-end only translates: its request into a ChatRequest, the events
back into its wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from ..errors import InvalidRequest
from . import constraints
from .output import grammar as tool_grammar
from .output.events import Event, IdFactory, Reasoning, Text, ToolCallEnd, new_call_id
from .output.families import HARMONY, HERMES, Family, ReasoningMode, detect_family, reasoning_mode
from .output.parser import OutputParser
from .output.prompt import Message, ToolSpec, render, with_format_instruction
from .text import TextStream
from .types import Generation, SamplingParams


@dataclass(frozen=True)
class ToolChoice:
    """auto (the model decides), none (no tools offered), required (at least one call), or
    named (that function, once)."""

    mode: str = "auto"
    name: Optional[str] = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


@dataclass(frozen=True)
class Tool:
    """A function tool of the request; `param` names its schema in the request (errors)."""

    spec: ToolSpec
    strict: bool = False
    param: str = "tools"


@dataclass(frozen=True)
class ResponseFormat:
    """json_object (any object) or json_schema (`schema`, `strict`); `param` names it."""

    kind: str
    schema: Optional[Mapping[str, Any]] = None
    strict: bool = False
    param: str = "response_format"


@dataclass(frozen=True)
class ChatRequest:
    """What a front-end asks of the engine, whatever its wire format."""

    model: Optional[str]
    params: SamplingParams
    max_tokens: Optional[int] = None  # None: the model's limit
    messages: tuple[Message, ...] = ()
    prompt: Union[None, str, tuple[int, ...]] = None  # a raw completion prompt: no template
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    # Several calls in one answer: None (not asked) lets a free answer make several and a
    # forced one make exactly one; True lets a forced answer make several too.
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    reasoning: Optional[bool] = None  # the template's thinking switch; None: its default
    # Most tokens of thinking before its end marker is forced (where the marker is one special
    # token: output/grammar.py); None: no cap.
    reasoning_budget: Optional[int] = None
    # The last message is an assistant turn to continue (a prefill), not one to answer.
    continue_final: bool = False
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    high_priority: bool = False
    messages_param: str = "messages"  # the field a template failure names


@dataclass(frozen=True)
class ModelFormats:
    """What a loaded model's formats are: its tool-call family and thinking markers, and the
    marker texts that are single tokens (for grammars). Found once per loaded model."""

    family: Optional[Family]
    reasoning: Optional[ReasoningMode]
    special: Mapping[str, int]


def formats_of(worker: Any, tool_parser: Optional[str]) -> ModelFormats:
    """The model's formats, kept on its worker (detection reads the chat template once)."""
    found = getattr(worker, "formats", None)
    if isinstance(found, ModelFormats):
        return found
    tok = worker.tokenizer
    found = ModelFormats(
        family=detect_family(tok, tool_parser),
        reasoning=reasoning_mode(tok),
        special=tool_grammar.special_tokens(tok),
    )
    worker.formats = found
    return found


@dataclass
class Prepared:
    """A request made concrete for one model: its prompt tokens and sampling (with the
    grammar, if any), and how to read its output."""

    prompt: list[int]
    params: SamplingParams
    family: Optional[Family]
    reasoning: Optional[ReasoningMode]
    tools: tuple[ToolSpec, ...]
    tools_enabled: bool

    def parser(self, id_factory: IdFactory = new_call_id) -> Optional[OutputParser]:
        """The output parser, or None when the answer is plain text (a raw completion)."""
        harmony = self.family == HARMONY
        if not self.tools_enabled and self.reasoning is None and not harmony:
            return None
        return OutputParser(
            self.family if self.tools_enabled or harmony else None,
            tools_enabled=self.tools_enabled,
            reasoning=self.reasoning,
            tools=self.tools,
            id_factory=id_factory,
        )


def _closed(spec: ToolSpec) -> ToolSpec:
    """A strict tool's parameters with every object closed to other properties."""
    doc = dict(spec.parameters)
    constraints.close_objects(doc)
    return replace(spec, parameters=doc)


def prepare(
    worker: Any,
    request: ChatRequest,
    tool_parser: Optional[str] = None,
    *,
    max_tokens: Optional[int] = None,
    constrain: bool = True,
) -> Prepared:
    """Render the prompt and build the grammar (tokenizer work, no MLX: the front runs it on a
    thread of its own, Generate._prepare). `max_tokens`: the model's cap (a thinking budget at
    or past it needs no grammar); `constrain`: false to render only (counting tokens)."""
    tok = worker.tokenizer
    fmt = formats_of(worker, tool_parser)
    if request.prompt is not None:  # a completion: the text as given, no template, no tools
        p = request.prompt
        if isinstance(p, tuple):
            ids = list(p)
        else:
            bos = getattr(tok, "bos_token", None)
            ids = list(tok.encode(p, add_special_tokens=bos is None or not p.startswith(bos)))
        return Prepared(ids, request.params, None, None, (), False)
    choice = request.tool_choice
    tools = tuple(_closed(t.spec) if t.strict else t.spec for t in request.tools)
    offered = tools if choice.mode != "none" else ()
    if choice.mode == "named" and choice.name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"tool_choice names {choice.name!r}, which is not one of the tools",
            param="tool_choice",
        )
    if choice.forced and not offered:
        raise InvalidRequest(
            "tool_choice requires a call but no tools were given", param="tool_choice"
        )
    kwargs = dict(request.template_kwargs)
    if request.reasoning is not None:
        kwargs.setdefault("enable_thinking", request.reasoning)
    msgs = request.messages
    prefill = (
        request.continue_final
        and bool(msgs)
        and msgs[-1].role == "assistant"
        and bool(msgs[-1].content)
        and not msgs[-1].tool_calls
    )
    rf = request.response_format
    if rf is not None and not choice.forced:  # the answer is the JSON: say which
        msgs = with_format_instruction(msgs, rf.schema if rf.kind == "json_schema" else None)
    try:
        prompt = render(
            tok,
            msgs,
            tools=offered,
            tool_choice="none" if not offered else choice.name or choice.mode,
            template_kwargs=kwargs,
            continue_final=prefill,
        )
    except InvalidRequest:
        raise
    except Exception as exc:  # a template that refuses the conversation
        raise InvalidRequest(
            f"the prompt could not be built: {exc}", param=request.messages_param
        ) from None
    family = fmt.family
    if offered and family is None:
        family = HERMES  # tools the template renders in a format no parser knows: fallback's
    thinking = None
    if fmt.reasoning is not None:
        thinking = reasoning_mode(tok, prompt)
    params = request.params
    budget = request.reasoning_budget
    caps = [n for n in (request.max_tokens, max_tokens) if n is not None]
    if budget is not None and caps and budget >= min(caps):
        budget = None  # the answer's own cap comes first
    if thinking is None or family == HARMONY:
        budget = None
    grammar = _grammar(request, offered, family, thinking, fmt, tok, budget) if constrain else None
    if grammar is not None:
        params = replace(params, constraint=grammar)
    return Prepared(prompt, params, family, thinking, offered, bool(offered))


def _grammar(
    request: ChatRequest,
    tools: tuple[ToolSpec, ...],
    family: Optional[Family],
    thinking: Optional[ReasoningMode],
    fmt: ModelFormats,
    tok: Any,
    budget: Optional[int] = None,
) -> Optional[constraints.Constraint]:
    """The constraint of a forced call, a schema-bound answer or a thinking budget, compiled
    and checked now (a 400 naming the field before any generation)."""
    bridge = _bridge(tok)
    choice = request.tool_choice
    if choice.forced and tools and family is not None:
        for tool in request.tools:  # a schema the compiler refuses is named by its own field
            if choice.mode == "required" or tool.spec.name == choice.name:
                constraints.json_schema(tool.spec.parameters, strict=tool.strict, param=tool.param)
        try:
            text = tool_grammar.grammar(
                family,
                tools,
                parallel=request.parallel_tool_calls is True and choice.mode == "required",
                force=choice.name if choice.mode == "named" else None,
                special=fmt.special,
                reasoning=thinking,
                budget=budget,
            )
        except ValueError as exc:
            raise InvalidRequest(
                f"tool_choice can't be enforced: {exc}", param="tool_choice"
            ) from None
        param = next((t.param for t in request.tools if t.spec.name == choice.name), "tools")
        return constraints.Constraint(
            constraints.lark(text, param=param, tokenizer=bridge), param=param
        )
    rf = request.response_format
    if rf is None:
        if budget is None or thinking is None:
            return None
        capped = tool_grammar.thinking_budget(
            reasoning=thinking, budget=budget, special=fmt.special
        )
        if capped is None:
            return None  # a text end marker: the budget is not enforced (docs/api.md)
        return constraints.Constraint(
            constraints.lark(capped, param="reasoning_budget", tokenizer=bridge),
            param="reasoning_budget",
        )
    if rf.kind == "json_object":
        schema: Mapping[str, Any] = {"type": "object"}
        strict = False
    else:
        schema, strict = rf.schema or {}, rf.strict
    if thinking is None:
        g = constraints.json_schema(schema, strict=strict, param=rf.param, tokenizer=bridge)
        return constraints.Constraint(g, param=rf.param)
    body = constraints.json_fragment(schema, strict=strict, param=rf.param)
    text = tool_grammar.with_thinking(body, reasoning=thinking, special=fmt.special, budget=budget)
    return constraints.Constraint(
        constraints.lark(text, param=rf.param, tokenizer=bridge), param=rf.param
    )


def _bridge(tok: Any) -> Optional[constraints.TokenizerBridge]:
    try:
        return constraints.TokenizerBridge.for_tokenizer(tok)
    except ValueError:  # a tokenizer llguidance can't read: checks at insert time say so
        return None


# -- the run


@dataclass(frozen=True)
class Step:
    """What one engine step gave a request: events, and which tokens (`start`, `count`) they
    came from (for per-token logprobs)."""

    events: list[Event]
    start: int
    count: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Run:
    """One request's output, read on the event loop: `steps()` yields a Step per engine step
    (None on a quiet tick, for keep-alives); then `finish`, `stop_sequence` and `usage()`."""

    def __init__(
        self,
        gen: Generation,
        tokenizer: Any,
        prepared: Prepared,
        *,
        deadline: float,
        id_factory: IdFactory = new_call_id,
        on_end: Optional[Callable[[], None]] = None,
    ) -> None:
        self.gen = gen
        self.on_end = on_end  # the slot is given back as soon as the output is complete
        self.tokenizer = tokenizer
        self.prepared = prepared
        self.deadline = deadline
        self.text = TextStream(tokenizer, prepared.params.stop)
        self.parser = prepared.parser(id_factory)
        self.finish: Optional[str] = None
        self.stop_sequence: Optional[str] = None
        self.reasoning_chars: list[str] = []

    @property
    def model(self) -> str:
        return self.gen.model

    def _events(self, text: str, tokens: Sequence[int]) -> list[Event]:
        if self.parser is None:
            return [Text(text)] if text else []
        events = self.parser.feed(text, tokens)
        for ev in events:
            if isinstance(ev, Reasoning):
                self.reasoning_chars.append(ev.text)
        return events

    async def steps(self) -> AsyncIterator[Optional[Step]]:
        """Events step by step; raises the engine's error or RequestTimeout."""
        gen, out = self.gen, self.text
        while True:
            if not await gen.wait_event():
                if asyncio.get_running_loop().time() > self.deadline:
                    from ..errors import RequestTimeout

                    raise RequestTimeout("the request ran past limits.request_timeout_s")
                yield None
                continue
            new, start = await gen.next_tokens(self.deadline)
            if not new:
                break
            text = out.feed(new)
            # Past a stop string's last token, the tokens are not part of the answer.
            count = out.used - start if out.stopped else len(new)
            events = self._events(text, new[:count])
            if events or self.prepared.params.logprobs:
                yield Step(events, start, count)
            if out.stopped:
                break
        tail = self._events(out.flush(), ())
        if self.parser is not None:
            tail += self.parser.close()
            for ev in tail:
                if isinstance(ev, Reasoning):
                    self.reasoning_chars.append(ev.text)
        self.finish = self._finish_reason()
        if self.on_end is not None:
            self.on_end()
        if tail:
            yield Step(tail, len(gen.tokens), 0)

    def _finish_reason(self) -> str:
        if self.text.stopped:
            self.stop_sequence = self.text.stop_hit
            reason = "stop"
        else:
            reason = self.gen.finish_reason or "stop"
        if reason == "stop" and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return reason

    @property
    def answer_tokens(self) -> int:
        """Tokens of the answer: up to the one that completed a stop string, when one did."""
        if self.text.stopped:
            return min(len(self.gen.tokens), self.text.used)
        return len(self.gen.tokens)

    def usage(self) -> Usage:
        reasoning = 0
        if self.reasoning_chars:
            text = "".join(self.reasoning_chars)
            reasoning = min(self.answer_tokens, len(self.tokenizer.encode(text)))
        return Usage(
            len(self.gen.prompt_tokens), self.answer_tokens, self.gen.cached_tokens, reasoning
        )


@dataclass
class Answer:
    """A whole answer, collected from a run's events (the non-streaming responses)."""

    text: str = ""
    reasoning: str = ""
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)

    def add(self, events: Sequence[Event]) -> None:
        names: dict[int, tuple[str, str]] = getattr(self, "_names", {})
        self._names = names
        for ev in events:
            if isinstance(ev, Text):
                self.text += ev.text
            elif isinstance(ev, Reasoning):
                self.reasoning += ev.text
            elif isinstance(ev, ToolCallEnd):
                call_id, name = names.get(ev.index, ("", ""))
                self.calls.append((call_id, name, ev.arguments))
            elif hasattr(ev, "name"):  # ToolCallStart
                names[ev.index] = (ev.id, ev.name)  # type: ignore[union-attr]
