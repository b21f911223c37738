"""Streaming parser of model output into events: answer text, thinking and tool calls.

    parser = OutputParser(family, tools_enabled=True, reasoning=mode, tools=specs)
    for piece in pieces:                     # each detokenized piece, as generated
        events += parser.feed(piece)         # harmony: parser.feed(piece, token_ids)
    events += parser.close()

How the output is read:

- Thinking (`<think>...</think>`, or from the start when `ReasoningMode.started`) becomes
  `Reasoning`, whether or not the request asked for it (the front-end decides what to show).
  Markup inside thinking is never a call. A stray end marker in the answer is dropped.
- Anything that could be the start of a marker (`<tool`, `[TOOL_`, a `{` at the start of a
  Llama answer) is held back until it is decided, then released as `Text` if it was not one.
- A call streams: `ToolCallStart` as soon as its name is known, then `ToolCallArgs` as the
  arguments arrive. JSON arguments are sent as the model wrote them, held only at points where
  they could not yet be completed (after a comma, inside a key, a number, an escape), so a cut
  can always be closed. XML-style arguments (qwen3_coder, glm) are turned into a JSON object:
  string-typed values stream as JSON string pieces; other values (typed by the tool's schema)
  are sent whole when complete. The arguments of every call are one JSON object text, and
  `ToolCallEnd.arguments` equals the concatenation of its deltas.
- Whitespace right before a call and right after one is dropped, as is whitespace at the
  start of the answer after thinking and around thinking itself.

Malformed output (decided for OpenAI-compatible clients, which json.loads the arguments and
run the call; never an exception, never lost text):

- A call cut off (max_tokens, a stop string) after its name was known is still reported: its
  arguments are completed to the shortest valid JSON object (open strings and containers
  closed, a key left without value gets null). The finish reason ("length") tells the client.
- A call whose name was never known (cut off, unparseable, unknown structure) is not a call:
  its raw text, markup included, is released as `Text`.
- Arguments that stop being valid JSON after the call started (`{"city": Paris}`): the call
  ends with the valid part completed as above, and the rest of the call's text up to its end
  marker is released as `Text`.
- Arguments given as a JSON string holding an object (`"arguments": "{\\"a\\": 1}"`) are
  decoded and sent in one piece; any other non-object arguments become `{}`.
- With tools disabled nothing is parsed as a call: markup stays in the text.
- Names are not checked against the request's tools: the client sees what the model called.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .events import (
    Event,
    IdFactory,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    merge,
    new_call_id,
)
from .families import HARMONY, LLAMA3, MISTRAL, Family, ReasoningMode
from .jsonscan import CONT, DONE, ERR, JsonScan

__all__ = ["OutputParser", "tool_schemas"]

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CALLS = "[TOOL_CALLS]"
_LLAMA_ENDS = ("<|eom_id|>", "<|eot_id|>")
_WS = " \t\n\r"
_MAX_NAME = 256  # longest function or parameter name read before giving up on a call
_NAME = re.compile(r"[\w$][\w.\-:/$]*")  # a function name in the XML-style forms


def tool_schemas(tools: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """{name: parameters schema} from ToolSpec values or OpenAI-style tool dicts."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools or ():
        if isinstance(t, Mapping):
            fn = t.get("function", t)
            name, params = fn.get("name"), fn.get("parameters")
        else:
            name, params = getattr(t, "name", None), getattr(t, "parameters", None)
        if isinstance(name, str):
            out[name] = dict(params) if isinstance(params, Mapping) else {}
    return out


def _held(buf: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `buf` that is a proper prefix of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


def _find_first(buf: str, markers: Iterable[str]) -> tuple[int, str]:
    at, which = -1, ""
    for m in markers:
        i = buf.find(m)
        if i != -1 and (at == -1 or i < at or (i == at and len(m) > len(which))):
            at, which = i, m
    return at, which


class OutputParser:
    """Turns one answer's generated text into events; see the module docstring.

    `family`: the tool-call format (None: no tool parsing). `tools_enabled`: the request
    offered tools (and did not say tool_choice "none"). `reasoning`: the model's thinking
    markers. `tools`: the request's tools, whose parameter schemas type XML-style values.
    `id_factory`: makes call ids ("call_..." by default). `encoding`: harmony only, an
    openai_harmony encoding (loaded with `harmony.load_encoding()` when not given).

    Families with `consumes_tokens` (harmony) read the token ids passed to `feed(text,
    tokens)` and ignore the text; the others read the text and ignore the ids.
    """

    def __init__(
        self,
        family: Optional[Family],
        *,
        tools_enabled: bool,
        reasoning: Optional[ReasoningMode],
        tools: Sequence[Any] = (),
        id_factory: IdFactory = new_call_id,
        encoding: Any = None,
    ) -> None:
        self.family = family
        self.consumes_tokens = family is not None and family.consumes_tokens
        if family == HARMONY:
            from .harmony import HarmonyOutput

            self._impl: Any = HarmonyOutput(
                tools_enabled=tools_enabled, id_factory=id_factory, encoding=encoding
            )
        else:
            self._impl = _TextOutput(
                family,
                tools_enabled=tools_enabled,
                reasoning=reasoning,
                schemas=tool_schemas(tools),
                id_factory=id_factory,
            )
        self._closed = False

    @property
    def calls(self) -> int:
        """Tool calls completed so far (a finish reason of "tool_calls" when > 0)."""
        return int(self._impl.calls)

    def feed(self, text: str, tokens: Sequence[int] = ()) -> list[Event]:
        """Events for the next piece of output (text, and its token ids for harmony)."""
        if self._closed:
            return []
        if self.consumes_tokens:
            return list(self._impl.feed_tokens(tokens))
        return list(self._impl.feed(text))

    def close(self) -> list[Event]:
        """Events for what was held back, and the end of an unfinished call."""
        if self._closed:
            return []
        self._closed = True
        return list(self._impl.close())


class _TextOutput:
    """The text-level parser: a text mode, a thinking mode, and one handler per call form."""

    def __init__(
        self,
        family: Optional[Family],
        *,
        tools_enabled: bool,
        reasoning: Optional[ReasoningMode],
        schemas: dict[str, dict[str, Any]],
        id_factory: IdFactory,
    ) -> None:
        self.family = family
        self.tools = tools_enabled and family is not None
        self.reasoning = reasoning
        self.schemas = schemas
        self.new_id = id_factory
        self.buf = ""
        self.out: list[Event] = []
        self.handler: Optional[_Handler] = None
        self.calls = 0
        self.index: Optional[int] = None  # the call in progress
        self._args: list[str] = []
        self._pending_ws = ""  # trailing whitespace of the text, held until decided
        self._strip_text = False  # drop leading whitespace (after thinking or a call)
        self._answer_start = True  # no answer text yet (Llama's JSON answer is only there)
        # Markers seen in text mode and what each starts.
        self._markers: dict[str, Callable[[], Optional[_Handler]]] = {}
        if reasoning is not None:
            self._markers[reasoning.start] = lambda: _Thinking(self)
            self._markers[reasoning.end] = lambda: None  # stray end of thinking: dropped
            if reasoning.started:
                self.handler = _Thinking(self)
        if self.tools:
            assert family is not None
            if family == MISTRAL:
                self._markers[TOOL_CALLS] = lambda: _Mistral(self, TOOL_CALLS)
            elif family == LLAMA3:
                self._markers[PYTHON_TAG] = lambda: _JsonCalls(
                    self, PYTHON_TAG, end=None, llama=True, strict=False
                )
            elif family.mlx_parser is not None:
                import importlib

                mod = importlib.import_module(f"mlx_lm.tool_parsers.{family.mlx_parser}")
                start, end = str(mod.tool_call_start), str(mod.tool_call_end or "")
                self._markers[start] = lambda: _Generic(self, start, end, mod.parse_tool_call)
            else:
                self._markers[TOOL_CALL] = lambda: _ToolCallBlock(self, TOOL_CALL)

    # -- the driver
    def feed(self, text: str) -> list[Event]:
        self.buf += text
        self._run(final=False)
        return self._take()

    def close(self) -> list[Event]:
        self._run(final=True)
        if self.handler is not None:
            h, self.handler = self.handler, None
            h.finish()
            self._run(final=True)
        if self._pending_ws and not self._strip_text:
            self._emit(Text(self._pending_ws))
        self._pending_ws = ""
        return self._take()

    def _run(self, final: bool) -> None:
        for _ in range(1_000_000):  # each step consumes input or changes state
            h = self.handler
            progressed = h.step(final) if h is not None else self._text_step(final)
            if not progressed:
                return

    def _take(self) -> list[Event]:
        out, self.out = self.out, []
        return merge(out)

    def _emit(self, ev: Event) -> None:
        self.out.append(ev)

    # -- what handlers call
    def text(self, s: str) -> None:
        """Answer text, with whitespace next to calls and thinking dropped."""
        if not s:
            return
        if self._strip_text:
            s = s.lstrip(_WS)
            if not s:
                return
            self._strip_text = False
        if self.tools:
            s = self._pending_ws + s
            core = s.rstrip(_WS)
            self._pending_ws = s[len(core) :]
            s = core
            if not s:
                return
        self._answer_start = False
        self._emit(Text(s))

    def release(self, raw: str) -> None:
        """Text that looked like a call and was not one: sent as it came."""
        self.text(raw)

    def reasoning_text(self, s: str) -> None:
        if s:
            self._emit(Reasoning(s))

    def thinking_over(self) -> None:
        self._strip_text = True
        self._pending_ws = ""

    def start_call(self, name: str) -> None:
        if self.handler is not None:
            self.handler.raw = ""  # what was read of this call is the call now
        self._pending_ws = ""
        self._answer_start = False
        self.index = self.calls
        self._args = []
        self._emit(ToolCallStart(self.calls, self.new_id(), name))

    def args(self, delta: str) -> None:
        if delta and self.index is not None:
            self._args.append(delta)
            self._emit(ToolCallArgs(self.index, delta))

    def end_call(self) -> None:
        if self.index is None:
            return
        arguments = "".join(self._args)
        if not arguments:
            arguments = "{}"
            self._emit(ToolCallArgs(self.index, arguments))
        self._emit(ToolCallEnd(self.index, arguments))
        self.index = None
        self.calls += 1
        self._strip_text = True
        self._pending_ws = ""

    def to_text(self) -> None:
        self.handler = None

    # -- text mode
    def _text_step(self, final: bool) -> bool:
        buf = self.buf
        if not buf:
            return False
        if self.tools and self.family == LLAMA3 and self._answer_start:
            # Llama answers a call with a bare JSON object: decide at the answer's start.
            lead = len(buf) - len(buf.lstrip(_WS))
            if lead == len(buf):
                if final:
                    self.buf = ""
                    self.text(buf)
                return False
            if buf[lead] == "{":
                self.buf = buf[lead:]
                self._pending_ws = ""
                self.handler = _JsonCalls(self, "", end=None, llama=True, strict=True)
                return True
            self._answer_start = False
        at, marker = _find_first(buf, self._markers)
        if at != -1:
            self.buf = buf[at + len(marker) :]
            self.text(buf[:at])
            self.handler = self._markers[marker]()
            return True
        keep = 0 if final else _held(buf, self._markers)
        self.buf = buf[len(buf) - keep :]
        self.text(buf[: len(buf) - keep])
        return False


class _Handler:
    """A mode of the text parser: consumes `p.buf` in `step`, ends what it holds in `finish`."""

    def __init__(self, p: _TextOutput, raw: str) -> None:
        self.p = p
        self.raw = raw  # consumed text of a call not yet started, released if it fails

    def step(self, final: bool) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        """The output ended inside this mode (the driver then reads the rest as text)."""
        raise NotImplementedError

    # helpers
    def consume(self, n: int) -> str:
        s = self.p.buf[:n]
        self.p.buf = self.p.buf[n:]
        if self.p.index is None:
            self.raw += s
        return s

    def skip_ws(self) -> bool:
        buf = self.p.buf
        n = len(buf) - len(buf.lstrip(_WS))
        if n:
            self.consume(n)
        return bool(self.p.buf)

    def fail(self, end: Optional[str]) -> None:
        """The call cannot be parsed further. Before its start: its raw text is answer text;
        after: it ends with its arguments completed. Then the rest up to `end` (the call's
        end marker) is text too, and the parser goes back to text mode."""
        p = self.p
        started = p.index is not None
        if started:
            self.close_args()
            p.end_call()
        raw, self.raw = self.raw, ""
        if raw:
            p.release(raw)
        if end:
            p.handler = _Skip(p, end, keep_marker=not started)
        else:
            p.to_text()

    def close_args(self) -> None:
        """Send what completes the arguments of the call in progress."""


class _Thinking(_Handler):
    def __init__(self, p: _TextOutput) -> None:
        super().__init__(p, "")
        assert p.reasoning is not None
        self.start = p.reasoning.start
        self.end = p.reasoning.end
        self.lead = True  # leading whitespace (and a repeated start marker) is dropped
        self.ws = ""

    def _out(self, s: str) -> None:
        if self.lead:
            s = s.lstrip(_WS)
            if not s:
                return
            self.lead = False
        s = self.ws + s
        core = s.rstrip(_WS)
        self.ws = s[len(core) :]
        self.p.reasoning_text(core)

    def step(self, final: bool) -> bool:
        p = self.p
        buf = p.buf
        if not buf:
            return False
        if self.lead:
            stripped = buf.lstrip(_WS)
            if stripped.startswith(self.start):
                p.buf = stripped[len(self.start) :]
                return True
            if not final and self.start.startswith(stripped):
                return False
        at = buf.find(self.end)
        if at != -1:
            p.buf = buf[at + len(self.end) :]
            self._out(buf[:at])
            p.thinking_over()
            p.to_text()
            return True
        keep = 0 if final else _held(buf, (self.end,))
        p.buf = buf[len(buf) - keep :]
        self._out(buf[: len(buf) - keep])
        return False

    def finish(self) -> None:
        if self.p.buf:
            self._out(self.p.buf)
            self.p.buf = ""
        self.p.thinking_over()


class _Skip(_Handler):
    """The rest of a broken call, up to its end marker, released as text."""

    def __init__(self, p: _TextOutput, end: str, keep_marker: bool) -> None:
        super().__init__(p, "")
        self.end = end
        self.keep_marker = keep_marker

    def step(self, final: bool) -> bool:
        p = self.p
        buf = p.buf
        if not buf:
            return False
        at = buf.find(self.end)
        if at != -1:
            cut = at + len(self.end)
            p.buf = buf[cut:]
            p.release(buf[:cut] if self.keep_marker else buf[:at])
            p.to_text()
            return True
        keep = 0 if final else _held(buf, (self.end,))
        p.buf = buf[len(buf) - keep :]
        p.release(buf[: len(buf) - keep])
        return False

    def finish(self) -> None:
        pass


# -- JSON call objects: {"name": ..., "arguments": {...}}


class _CallObject:
    """One JSON call object, read character by character. The name may come before or after
    the arguments; arguments are held until the name is known, then stream."""

    NAME_KEYS = ("name",)
    ARG_KEYS = ("arguments", "parameters")
    LLAMA_KEYS = ("name", "parameters", "arguments", "type")

    def __init__(self, p: _TextOutput, strict: bool) -> None:
        self.p = p
        self.strict = strict  # only the keys of a call may appear (Llama's bare JSON)
        self.state = "open"
        self.key = ""
        self.scan: Optional[JsonScan] = None
        self.kind = ""
        self.name: Optional[str] = None
        self.argscan: Optional[JsonScan] = None
        self.args_text: Optional[str] = None  # arguments decided whole (string form, null)

    @property
    def started(self) -> bool:
        return self.name is not None

    def push(self, ch: str) -> int:
        st = self.state
        if st == "value":
            assert self.scan is not None
            r = self.scan.push(ch)
            if r == CONT:
                if self.kind == "args" and self.started:
                    self.p.args(self.scan.take())
                return CONT
            if r == ERR:
                return ERR
            if not self._value_done():
                return ERR
            self.state = "after"
            return CONT if r == DONE else self.push(ch)
        if ch in _WS:
            return CONT
        if st == "open":
            if ch != "{":
                return ERR
            self.state = "key0"
            return CONT
        if st in ("key0", "key"):
            if ch == '"':
                self.scan = JsonScan(top='"')
                self.scan.push(ch)
                self.state = "inkey"
                return CONT
            if ch == "}" and st == "key0":
                return self._object_done()
            return ERR
        if st == "inkey":
            assert self.scan is not None
            r = self.scan.push(ch)
            if r == DONE:
                self.key = json.loads(self.scan.text())
                self.state = "colon"
            return CONT if r in (CONT, DONE) else ERR
        if st == "colon":
            if ch != ":":
                return ERR
            self.state = "value0"
            return CONT
        if st == "value0":
            key = self.key
            if key in self.NAME_KEYS and self.name is None:
                self.kind, self.scan = "name", JsonScan(top='"')
            elif key in self.ARG_KEYS and self.argscan is None and self.args_text is None:
                if ch == "{":
                    self.kind, self.scan = "args", JsonScan(top="{")
                    self.argscan = self.scan
                elif ch == '"':
                    self.kind, self.scan = "args_str", JsonScan(top='"')
                elif ch == "n":
                    self.kind, self.scan = "args_null", JsonScan(top="n")
                else:
                    return ERR
            elif self.strict and key not in self.LLAMA_KEYS:
                return ERR
            else:
                self.kind, self.scan = "skip", JsonScan()
            self.state = "value"
            return self.push(ch)
        if st == "after":
            if ch == ",":
                self.state = "key"
                return CONT
            if ch == "}":
                return self._object_done()
            return ERR
        return ERR

    def _value_done(self) -> bool:
        scan = self.scan
        assert scan is not None
        if self.kind == "name":
            name = json.loads(scan.text())
            if not isinstance(name, str) or not name.strip():
                return False
            self.name = name.strip()
            self.p.start_call(self.name)
            if self.argscan is not None:
                self.p.args(self.argscan.take())
            elif self.args_text is not None:
                self.p.args(self.args_text)
        elif self.kind == "args":
            if self.started:
                self.p.args(scan.take())
        elif self.kind == "args_str":
            self.args_text = _object_text(json.loads(scan.text()))
            if self.started:
                self.p.args(self.args_text)
        elif self.kind == "args_null":
            self.args_text = "{}"
            if self.started:
                self.p.args(self.args_text)
        return True

    def _object_done(self) -> int:
        if self.name is None:
            return ERR
        self.close_args()
        self.p.end_call()
        return DONE

    def close_args(self) -> None:
        """At a cut or an error: send what makes the arguments a valid object."""
        if self.argscan is not None:
            self.argscan.finish()
            self.p.args(self.argscan.take_closed())
        elif self.args_text is None:
            self.p.args("{}")


def _push_all(scan: JsonScan, buf: str) -> tuple[int, int]:
    """Feeds `buf` to `scan` until the value ends or breaks: (last result, characters used)."""
    for i, ch in enumerate(buf):
        r = scan.push(ch)
        if r == ERR:
            return r, i
        if r == DONE:
            return r, i + 1
    return CONT, len(buf)


def _object_text(s: Any) -> str:
    """The JSON object text held in a string value of "arguments", else {}."""
    if isinstance(s, str):
        try:
            v = json.loads(s)
        except ValueError:
            return "{}"
        if isinstance(v, dict):
            return s.strip()
    return "{}"


class _JsonCalls(_Handler):
    """One or more JSON call objects: a single object, a list of them, or (Llama) objects
    separated by ';'. `end`: the marker that closes the block (hermes' </tool_call>)."""

    def __init__(
        self, p: _TextOutput, raw: str, *, end: Optional[str], llama: bool, strict: bool
    ) -> None:
        super().__init__(p, raw)
        self.end = end
        self.llama = llama
        self.strict = strict
        self.state = "lead"
        self.obj: Optional[_CallObject] = None
        self.in_list = False

    def step(self, final: bool) -> bool:
        p = self.p
        if self.state == "tail":
            return self._tail(final)
        buf = p.buf
        n = len(buf)
        i = 0  # characters consumed
        mark = 0  # buf[mark:i]: consumed, not yet in `raw`; all before or all after a start

        def sync() -> None:
            # Hand the consumed text back to the parser (one slice per step, not per char).
            if p.index is None:
                self.raw += buf[mark:i]
            p.buf = buf[i:]

        while i < n:
            ch = buf[i]
            st = self.state
            if st == "obj":
                assert self.obj is not None
                was_started = self.obj.started
                r = self.obj.push(ch)
                if r == ERR:
                    sync()
                    self.fail(self.end)
                    return True
                i += 1
                if r == DONE:
                    self.raw = ""
                    mark = i
                    self.obj = None
                    self.state = "listafter" if self.in_list else "between"
                elif not was_started and self.obj.started:
                    mark = i  # the call's own text: not raw any more
                continue
            if ch in _WS:
                i += 1
                continue
            if st in ("lead", "next"):
                if ch == "[" and st == "lead" and not self.llama:
                    self.in_list = True
                    i += 1
                    self.state = "next"
                    continue
                if ch == "{":
                    self.obj = _CallObject(p, strict=self.strict)
                    self.state = "obj"
                    continue
                sync()
                self.fail(self.end)
                return True
            if st == "listafter":
                if ch == ",":
                    i += 1
                    self.state = "next"
                    continue
                if ch == "]":
                    i += 1
                    self.in_list = False
                self.state = "tail"
                sync()
                return True
            if st == "between":
                if self.llama and ch == ";":
                    i += 1
                    self.state = "next"
                    continue
                self.state = "tail"
                sync()
                return True
        sync()
        return i > 0

    def _tail(self, final: bool) -> bool:
        # After the calls: the block's end marker (or Llama's end tokens); anything else is text.
        p = self.p
        buf = p.buf.lstrip(_WS)
        ends = (self.end,) if self.end else (_LLAMA_ENDS if self.llama else ())
        for e in ends:
            if buf.startswith(e):
                p.buf = buf[len(e) :]
                p.to_text()
                return True
        if not buf or (not final and any(e.startswith(buf) for e in ends)):
            if final:
                p.buf = ""
                p.to_text()
                return True
            p.buf = buf
            return False
        if self.end:
            p.buf = buf
            p.handler = _Skip(p, self.end, keep_marker=False)
        else:
            p.to_text()
        return True

    def finish(self) -> None:
        if self.obj is not None and self.obj.started:
            self.obj.close_args()
            self.p.end_call()
            self.raw = ""
        if self.raw:
            self.p.release(self.raw)
            self.raw = ""

    def close_args(self) -> None:
        if self.obj is not None:
            self.obj.close_args()


class _ToolCallBlock(_Handler):
    """After <tool_call>: decides the body's form (JSON object or list, qwen3_coder's
    <function=...>, or GLM's name with <arg_key>/<arg_value> pairs)."""

    FUNCTION = "<function="

    def step(self, final: bool) -> bool:
        p = self.p
        if not self.skip_ws():
            return False
        buf = p.buf
        if buf[0] in "{[":
            p.handler = _JsonCalls(p, self.raw, end=TOOL_CALL_END, llama=False, strict=False)
            return True
        if buf.startswith(self.FUNCTION):
            self.consume(len(self.FUNCTION))
            p.handler = _XmlCall(p, self.raw)
            return True
        if buf.startswith(TOOL_CALL_END):
            self.consume(len(TOOL_CALL_END))  # an empty block: nothing to call, nothing to say
            self.raw = ""
            p.to_text()
            return True
        if not final and (self.FUNCTION.startswith(buf) or TOOL_CALL_END.startswith(buf)):
            return False
        if buf[0] == "<":
            self.fail(TOOL_CALL_END)
            return True
        p.handler = _GlmCall(p, self.raw)
        return True

    def finish(self) -> None:
        if self.raw:
            self.p.release(self.raw)


# -- XML-style calls: values typed by the tool's schema

_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


def _param_type(schema: Mapping[str, Any], name: str) -> Optional[str]:
    """The declared type of parameter `name` ("" when the schema gives none, None when the
    parameter is not in the schema)."""
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping) or name not in props:
        return None
    spec = props[name]
    if not isinstance(spec, Mapping):
        return ""
    t = spec.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "")
    if not t:
        for key in ("anyOf", "oneOf"):
            for alt in spec.get(key) or ():
                if isinstance(alt, Mapping) and alt.get("type") not in (None, "null"):
                    return str(alt["type"]).lower()
        if "enum" in spec and all(isinstance(v, str) for v in spec["enum"]):
            return "string"
        return ""
    return str(t).strip().lower()


def _convert(value: str, ptype: str) -> Any:
    """A qwen3_coder parameter value typed by its schema (as mlx-lm's parser does); a value
    that does not fit its type stays a string."""
    if value.lower() == "null":
        return None
    if ptype == "":
        try:
            v = json.loads(value)
        except ValueError:
            return value
        return v if isinstance(v, (dict, list)) else value
    try:
        if ptype.startswith(("int", "uint", "long", "short", "unsigned")):
            f = float(value)
            if f != int(f):
                return value
            return int(f)
        if ptype.startswith(("num", "float", "double")):
            f = float(value)
            return int(f) if f == int(f) else f
    except (ValueError, OverflowError):
        return value
    if ptype in ("boolean", "bool", "binary"):
        low = value.strip().lower()
        return low == "true" if low in ("true", "false") else value
    if ptype in ("object", "array", "arr") or ptype.startswith(("dict", "list")):
        try:
            return json.loads(value, strict=False)
        except ValueError:
            pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _deserialize(value: str) -> Any:
    """A GLM argument value that is not declared a string: JSON, a Python literal, or text."""
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _jstr(s: str) -> str:
    """`s` as the inside of a JSON string."""
    return json.dumps(s, ensure_ascii=False)[1:-1]


class _XmlValues(_Handler):
    """What qwen3_coder and GLM share: an object built key by key, values streamed when they
    are strings and sent whole otherwise."""

    def __init__(self, p: _TextOutput, raw: str) -> None:
        super().__init__(p, raw)
        self.name = ""
        self.schema: Mapping[str, Any] = {}
        self.nparams = 0
        self.in_string = False  # a string value is open (its quote sent)
        self.value: list[str] = []
        self.ptype: Optional[str] = None
        self.vstate = 0  # 0: leading part not yet seen; 1: inside the value
        self.tail = ""  # held end of a streamed value (a newline or whitespace to strip)

    def begin(self, name: str) -> None:
        self.name = name
        self.schema = self.p.schemas.get(name, {})
        self.p.start_call(name)
        self.raw = ""
        self.p.args("{")

    def open_value(self, key: str, streamed: bool) -> None:
        sep = ", " if self.nparams else ""
        self.nparams += 1
        self.value = []
        self.vstate = 0
        self.tail = ""
        if streamed:
            self.p.args(f'{sep}{json.dumps(key, ensure_ascii=False)}: "')
            self.in_string = True
        else:
            self.pending_key = sep + json.dumps(key, ensure_ascii=False) + ": "

    def close_value(self, whole: Optional[Any] = None) -> None:
        if self.in_string:
            self.p.args('"')
            self.in_string = False
        else:
            self.p.args(self.pending_key + json.dumps(whole, ensure_ascii=False))

    def end_value(self, marker: str, own_end: str) -> None:
        """The value read up to `marker` is complete: close it (converted unless a streamed
        string), and consume `marker` when it is the value's own end tag."""
        if self.in_string:
            self.close_value()
        else:
            self.close_value(self.convert("".join(self.value)))
        self.value = []
        self.vstate = 0
        if marker == own_end:
            self.consume(len(marker))

    def close_args(self) -> None:
        if self.in_string:
            self.close_value()
        elif self.value or self.vstate:
            self.close_value(self.convert("".join(self.value)))
        self.value = []
        self.vstate = 0
        self.p.args("}")

    def convert(self, text: str) -> Any:
        raise NotImplementedError

    def read_value(self, final: bool, ends: tuple[str, ...], strip: str) -> Optional[str]:
        """Reads the value up to the first of `ends`; streams it when it is a string. `strip`:
        the characters dropped at both ends (qwen3_coder: one newline; GLM: whitespace).
        Returns the end marker found (not consumed), or None when more input is needed."""
        p = self.p
        buf = p.buf
        if self.vstate == 0:
            if strip == "\n":
                if not buf:
                    return None
                if buf[0] == "\n":
                    buf = buf[1:]
            else:
                buf = buf.lstrip(strip)
                if not buf:
                    p.buf = ""
                    return None
            self.vstate = 1
        at, marker = _find_first(buf, ends)
        if at != -1:
            piece = self.tail + buf[:at]
            self.tail = ""
            piece = piece[:-1] if strip == "\n" and piece.endswith("\n") else piece.rstrip(strip)
            self._value_piece(piece)
            p.buf = buf[at:]
            return marker
        keep = 0 if final else _held(buf, ends)
        piece = self.tail + buf[: len(buf) - keep]
        p.buf = buf[len(buf) - keep :]
        # Hold what could be stripped before the end marker.
        core = (
            piece.rstrip(strip)
            if strip != "\n"
            else (piece[:-1] if piece.endswith("\n") else piece)
        )
        self.tail = piece[len(core) :]
        self._value_piece(core)
        return None

    def _value_piece(self, s: str) -> None:
        if not s:
            return
        if self.in_string:
            self.p.args(_jstr(s))
        else:
            self.value.append(s)


class _XmlCall(_XmlValues):
    """qwen3_coder: <function=NAME> (<parameter=P>value</parameter>)* </function>."""

    PARAM = "<parameter="
    PARAM_END = "</parameter>"
    FUNC_END = "</function>"
    ENDS = (PARAM_END, PARAM, FUNC_END, TOOL_CALL_END)

    def __init__(self, p: _TextOutput, raw: str) -> None:
        super().__init__(p, raw)
        self.state = "name"

    def convert(self, text: str) -> Any:
        return _convert(text, self.ptype or "")

    def step(self, final: bool) -> bool:
        p = self.p
        st = self.state
        if st == "name" or st == "pname":
            # The same checks on a partial name as on a whole one: chunking must not matter.
            at = p.buf.find(">")
            word = (p.buf if at == -1 else p.buf[:at]).strip(_WS)
            bad = len(word) > _MAX_NAME or any(c in word for c in "<\n")
            if at == -1 and not bad:
                return False
            if bad or not (_NAME.fullmatch(word) if st == "name" else word):
                self.fail(TOOL_CALL_END)
                return True
            self.consume(at + 1)
            if st == "name":
                self.begin(word)
            else:
                self.ptype = _param_type(self.schema, word)
                self.open_value(word, streamed=self.ptype is None or self.ptype in _STRING_TYPES)
            self.state = "params" if st == "name" else "value"
            return True
        if st == "value":
            marker = self.read_value(final, self.ENDS, "\n")
            if marker is None:
                return False
            self.end_value(marker, self.PARAM_END)
            self.state = "params"
            return True
        if st in ("params", "after"):
            if not self.skip_ws():
                return False
            buf = p.buf
            if st == "params":
                for marker, nxt in ((self.PARAM, "pname"), (self.FUNC_END, "after")):
                    if buf.startswith(marker):
                        self.consume(len(marker))
                        if nxt == "after":
                            p.args("}")
                            p.end_call()
                        self.state = nxt
                        return True
            if buf.startswith(TOOL_CALL_END):
                self.consume(len(TOOL_CALL_END))
                if st == "params":
                    p.args("}")
                    p.end_call()
                p.to_text()
                return True
            if st == "after" and buf.startswith(_ToolCallBlock.FUNCTION):
                self.consume(len(_ToolCallBlock.FUNCTION))
                self.state = "name"
                return True
            options = (
                (self.PARAM, self.FUNC_END, TOOL_CALL_END)
                if st == "params"
                else (TOOL_CALL_END, _ToolCallBlock.FUNCTION)
            )
            if not final and any(o.startswith(buf) for o in options):
                return False
            if st == "after":
                p.handler = _Skip(p, TOOL_CALL_END, keep_marker=False)
            else:
                self.fail(TOOL_CALL_END)
            return True
        return False

    def finish(self) -> None:
        if self.p.index is not None:
            if self.state == "value":
                self.read_value(True, self.ENDS, "\n")
            self.close_args()
            self.p.end_call()
        elif self.raw:
            self.p.release(self.raw)


class _GlmCall(_XmlValues):
    """GLM 4.5/4.7: NAME (<arg_key>k</arg_key><arg_value>v</arg_value>)* </tool_call>; also
    NAME followed by a JSON arguments object."""

    KEY = "<arg_key>"
    KEY_END = "</arg_key>"
    VALUE = "<arg_value>"
    VALUE_END = "</arg_value>"

    def __init__(self, p: _TextOutput, raw: str) -> None:
        super().__init__(p, raw)
        self.state = "name"
        self.key = ""
        self.scan: Optional[JsonScan] = None
        self.opened = False  # the arguments' "{" was sent

    def convert(self, text: str) -> Any:
        return _deserialize(text)

    def step(self, final: bool) -> bool:
        p = self.p
        st = self.state
        if st == "name":
            buf = p.buf
            stop = min(
                (i for i in (buf.find("\n"), buf.find("<"), buf.find("{")) if i != -1), default=-1
            )
            if stop == -1:
                if final or len(buf.strip(_WS)) > _MAX_NAME:
                    self.fail(TOOL_CALL_END)  # a name never ended: not a call
                    return True
                return False
            word = buf[:stop].strip()
            if len(word) > _MAX_NAME or not _NAME.fullmatch(word):
                self.fail(TOOL_CALL_END)
                return True
            self.consume(stop)
            self.name = word
            self.p.start_call(word)
            self.raw = ""
            self.schema = self.p.schemas.get(word, {})
            self.state = "args"
            return True
        if st == "json":
            assert self.scan is not None
            r, used = _push_all(self.scan, p.buf)
            p.buf = p.buf[used:]
            p.args(self.scan.take())
            if r == ERR:
                self.fail(TOOL_CALL_END)
                return True
            if r == DONE:
                p.end_call()
                p.handler = _Skip(p, TOOL_CALL_END, keep_marker=False)
                return True
            return used > 0
        if st in ("args", "key_ws"):
            if not self.skip_ws():
                return False
            buf = p.buf
            if st == "args" and not self.opened and buf[0] == "{":
                self.scan = JsonScan(top="{")
                self.state = "json"
                return True
            want = (self.KEY,) if st == "args" else (self.VALUE,)
            if buf.startswith(want[0]):
                self.consume(len(want[0]))
                if st == "args":
                    if not self.opened:
                        p.args("{")
                        self.opened = True
                    self.state = "key"
                else:
                    self.ptype = "string" if self._is_string(self.key) else ""
                    self.open_value(self.key, streamed=self.ptype == "string")
                    self.state = "value"
                return True
            if st == "args" and buf.startswith(TOOL_CALL_END):
                self.consume(len(TOOL_CALL_END))
                p.args("}" if self.opened else "{}")
                p.end_call()
                p.to_text()
                return True
            options = want + ((TOOL_CALL_END,) if st == "args" else ())
            if not final and any(o.startswith(buf) for o in options):
                return False
            self.fail(TOOL_CALL_END)
            return True
        if st == "key":
            at = p.buf.find(self.KEY_END)
            if at == -1 or at > _MAX_NAME:
                if len(p.buf) > _MAX_NAME + len(self.KEY_END):
                    self.fail(TOOL_CALL_END)
                    return True
                return False
            self.key = p.buf[:at].strip()
            self.consume(at + len(self.KEY_END))
            self.state = "key_ws"
            return True
        if st == "value":
            marker = self.read_value(final, (self.VALUE_END, self.KEY, TOOL_CALL_END), _WS)
            if marker is None:
                return False
            self.end_value(marker, self.VALUE_END)
            self.state = "args"
            return True
        return False

    def _is_string(self, key: str) -> bool:
        props = self.schema.get("properties") if isinstance(self.schema, Mapping) else None
        spec = props.get(key) if isinstance(props, Mapping) else None
        return isinstance(spec, Mapping) and spec.get("type") == "string"

    def finish(self) -> None:
        p = self.p
        if p.index is None:
            if self.raw:
                p.release(self.raw)
            return
        if self.state == "json":
            assert self.scan is not None
            self.scan.finish()
            p.args(self.scan.take_closed())
        else:
            if self.state == "value":
                self.read_value(True, (self.VALUE_END, self.KEY, TOOL_CALL_END), _WS)
            self.close_args()
        p.end_call()

    def close_args(self) -> None:
        if self.state == "json" and self.scan is not None:
            self.scan.finish()
            self.p.args(self.scan.take_closed())
        elif not self.opened:
            self.p.args("{}")
        else:
            super().close_args()


class _Mistral(_Handler):
    """After [TOOL_CALLS]: a JSON list of calls, or NAME[ARGS]{...} (optionally
    NAME[CALL_ID]id[ARGS]{...}), the latter possibly repeated without a new [TOOL_CALLS]."""

    ARGS = "[ARGS]"
    CALL_ID = "[CALL_ID]"

    def __init__(self, p: _TextOutput, raw: str, *, again: bool = False) -> None:
        super().__init__(p, raw)
        self.state = "lead"
        self.again = again  # reading a possible next NAME[ARGS] after a call: not a failure
        self.scan: Optional[JsonScan] = None

    def step(self, final: bool) -> bool:
        p = self.p
        st = self.state
        if st == "lead":
            if not self.skip_ws():
                if final:
                    return False
                return False
            if p.buf[0] == "[" and not self.again and not p.buf.startswith("[ARGS"):
                p.handler = _JsonCalls(p, self.raw, end=None, llama=False, strict=False)
                return True
            self.state = "name"
            return True
        if st == "name":
            buf = p.buf
            n = 0
            while n < len(buf) and (buf[n].isalnum() or buf[n] in "_.-"):
                n += 1
            if n == len(buf) and not final and n <= _MAX_NAME:
                return False
            rest = buf[n:]
            for marker in (self.ARGS, self.CALL_ID):
                if rest.startswith(marker) and n:
                    self.name = buf[:n]
                    self.consume(n + len(marker))
                    if marker == self.ARGS:
                        self._begin()
                    else:
                        self.state = "callid"
                    return True
            if not final and n and any(m.startswith(rest) for m in (self.ARGS, self.CALL_ID)):
                return False
            self._not_a_call()
            return True
        if st == "callid":
            at = p.buf.find(self.ARGS)
            if at == -1 or at > _MAX_NAME:
                if len(p.buf) > _MAX_NAME + len(self.ARGS):
                    self._not_a_call()
                    return True
                return False
            self.consume(at + len(self.ARGS))
            self._begin()
            return True
        if st == "args":
            assert self.scan is not None
            r, used = _push_all(self.scan, p.buf)
            p.buf = p.buf[used:]
            p.args(self.scan.take())
            if r == ERR:
                self.fail(None)
                return True
            if r == DONE:
                p.end_call()
                p.handler = _Mistral(p, "", again=True)
                return True
            return used > 0
        return False

    def _begin(self) -> None:
        self.p.start_call(self.name)
        self.raw = ""
        self.scan = JsonScan(top="{")
        self.state = "args"

    def _not_a_call(self) -> None:
        if self.again:
            # Not another call: what was read is answer text.
            raw, self.raw = self.raw, ""
            self.p.release(raw)
            self.p.to_text()
        else:
            self.fail(None)

    def close_args(self) -> None:
        if self.scan is not None and self.state == "args":
            self.scan.finish()
            self.p.args(self.scan.take_closed())

    def finish(self) -> None:
        if self.p.index is not None:
            self.close_args()
            self.p.end_call()
        elif self.raw:
            self.p.release(self.raw)


class _Generic(_Handler):
    """Another mlx-lm format: the call is read whole up to its end marker (or the end of the
    output) and parsed by mlx-lm; its arguments then come as one piece."""

    def __init__(self, p: _TextOutput, raw: str, end: str, parse: Callable[..., Any]) -> None:
        super().__init__(p, raw)
        self.end = end
        self.parse = parse
        self.body = ""

    def step(self, final: bool) -> bool:
        p = self.p
        if not p.buf:
            return False
        self.body += p.buf
        p.buf = ""
        at = self.body.find(self.end) if self.end else -1
        if at == -1:
            return False
        p.buf = self.body[at + len(self.end) :]
        self.body = self.body[:at]
        self._parse(self.end)
        p.to_text()
        return True

    def _parse(self, end: str = "") -> None:
        p = self.p
        tools = [
            {"type": "function", "function": {"name": n, "parameters": s}}
            for n, s in p.schemas.items()
        ]
        try:
            parsed = self.parse(self.body, tools or None)
            calls = parsed if isinstance(parsed, list) else [parsed]
            ready = []
            for c in calls:
                name, args = c["name"], c.get("arguments", {})
                if isinstance(args, str):
                    args = json.loads(args)
                if not isinstance(name, str) or not isinstance(args, dict):
                    raise ValueError("not a call")
                ready.append((name, json.dumps(args, ensure_ascii=False)))
        except Exception:  # mlx-lm's parsers raise anything on text that is not a call
            p.release(self.raw + self.body + end)
            self.raw = ""
            return
        for name, args in ready:
            p.start_call(name)
            p.args(args)
            p.end_call()
        self.raw = ""

    def finish(self) -> None:
        self._parse()
