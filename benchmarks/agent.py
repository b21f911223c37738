"""The agent scenario: S sessions, each T turns of one growing tool-using conversation.

    python -m benchmarks --agent [--agent-shape demo|1b] [--agent-sessions S] [--agent-turns T]

Every turn resends the whole conversation (streaming chat completions with `tools` in the
request): a system prompt and a tool list shared by every session, the assistant's previous
answers (as the server generated them), and new content, alternately a tool result after an
assistant tool call and a user message. Tool calls and results are synthetic, deterministic by
seed: the model is not asked to call tools meaningfully, only to read and answer.

A round is one turn of every session. In the first round session 0 sends first and the others
once it has its first token (the shared prefix is then the server's to reuse). In round r >= 1
(from 0) one session, (r - 1) mod S, brings long new content (a file); it sends once every other
session of the round has its first token, so its prefill runs while they decode. Rounds
alternate between the servers (appliance then mlx_lm.server, then the other order), each keeping
its own conversations; the other server is idle meanwhile.

Both servers get the same model folder: the bench model's files linked, with a chat template that
renders the tools and the assistant's calls (the demo model's own renders neither, so one server
would show the tools to the model and the other not).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import httpx
import orjson

from benchmarks.common import percentile, say
from benchmarks.scenarios import APPLIANCE, MLX_SERVER, SERVERS, Plan

# -- the tools: shared by every session, in every request


def _fn(name: str, desc: str, props: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": props, "required": list(required)}
    return {
        "type": "function",
        "function": {"name": name, "description": desc, "parameters": params},
    }


def _s(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "description": desc, **kw}


def _i(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "integer", "description": desc, **kw}


TOOLS: tuple[dict[str, Any], ...] = (
    _fn(
        "read_file",
        "Read a text file of the repository, whole or a range of lines.",
        {
            "path": _s("Path relative to the repository root."),
            "start_line": _i("First line, 1-based.", minimum=1),
            "end_line": _i("Last line, inclusive.", minimum=1),
        },
        ["path"],
    ),
    _fn(
        "write_file",
        "Replace a file's whole content, creating it if missing.",
        {"path": _s("Path relative to the repository root."), "content": _s("New content.")},
        ["path", "content"],
    ),
    _fn(
        "edit_file",
        "Replace one exact occurrence of a string in a file.",
        {
            "path": _s("Path relative to the repository root."),
            "old": _s("Text to find; must occur exactly once."),
            "new": _s("Replacement text."),
        },
        ["path", "old", "new"],
    ),
    _fn(
        "list_dir",
        "List the entries of a folder.",
        {
            "path": _s("Folder path."),
            "depth": _i("How many levels to descend.", minimum=1, maximum=5),
        },
        ["path"],
    ),
    _fn(
        "grep",
        "Search files for a regular expression.",
        {
            "pattern": _s("Regular expression."),
            "glob": _s("Only files matching this glob."),
            "max_results": _i("At most this many matches.", minimum=1),
        },
        ["pattern"],
    ),
    _fn(
        "run_command",
        "Run a shell command in the repository and return its output.",
        {
            "command": _s("The command line."),
            "timeout_s": _i("Stop it after this many seconds.", minimum=1, maximum=600),
        },
        ["command"],
    ),
    _fn(
        "run_tests",
        "Run the test suite, or a part of it.",
        {
            "selector": _s("Test file, class or function."),
            "fail_fast": {"type": "boolean", "description": "Stop at the first failure."},
        },
        [],
    ),
    _fn(
        "git_diff",
        "Show uncommitted changes.",
        {"path": _s("Only this path."), "staged": {"type": "boolean", "description": "Staged."}},
        [],
    ),
    _fn(
        "git_commit",
        "Commit staged changes.",
        {"message": _s("Commit message."), "paths": {"type": "array", "items": {"type": "string"}}},
        ["message"],
    ),
    _fn(
        "web_search",
        "Search the documentation index.",
        {"query": _s("Search words."), "limit": _i("Number of results.", minimum=1)},
        ["query"],
    ),
    _fn(
        "open_issue",
        "File an issue in the tracker.",
        {
            "title": _s("Short title."),
            "body": _s("Description."),
            "labels": {"type": "array", "items": {"type": "string", "enum": ["bug", "perf"]}},
        },
        ["title", "body"],
    ),
    _fn(
        "ask_user",
        "Ask the user a question and wait for the answer.",
        {
            "question": _s("The question."),
            "choices": {"type": "array", "items": {"type": "string"}},
        },
        ["question"],
    ),
)


def tool_list(descriptions: bool = True) -> list[dict[str, Any]]:
    """The tools as sent; without descriptions (every `description` key dropped, at any depth)
    for a model whose context is small."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "description"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return [json.loads(json.dumps(t)) if descriptions else strip(t) for t in TOOLS]


# A template that renders the tools (first, shared by every session) and the assistant's calls.
AGENT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>tools<|end_header_id|>\n\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] or '' }}{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)


def agent_model(src: Path, dest: Path) -> Path:
    """`dest`: the model of `src` (its files linked) with AGENT_TEMPLATE as its chat template."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer_config.json" and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = AGENT_TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return dest


# -- the shape of a run


@dataclass(frozen=True)
class AgentShape:
    """Sizes of one agent run; content sizes are in characters (the demo tokenizer makes about
    1.6 characters a token)."""

    name: str
    sessions: int
    turns: int
    max_tokens: int
    system_chars: int
    first_chars: int  # the first user message (a task and some context)
    short_chars: int  # a tool result or a user message
    long_chars: int  # the round's long content (a file)
    descriptions: bool  # tool descriptions sent (a small context leaves them out)
    context_length: int  # what the appliance's catalog entry is given


SHAPES = {
    # The demo model: 4096 positions; a run of a few minutes on 2 CPU cores.
    "demo": AgentShape("demo", 4, 5, 32, 400, 300, 160, 1000, False, 4096),
    # The 1B shape on an accelerator: contexts growing to about 32k tokens.
    "1b": AgentShape("1b", 4, 8, 32, 3000, 3000, 600, 19000, True, 40960),
}


def long_session(rnd: int, sessions: int) -> Optional[int]:
    """The session that brings long content in round `rnd` (none in the first round)."""
    return None if rnd == 0 or sessions < 1 else (rnd - 1) % sessions


def followers(rnd: int, sessions: int) -> frozenset[int]:
    """The sessions of round `rnd` that send once every other one has its first token: in the
    first round all but session 0 (the shared system prompt and tools are then known to the
    server), later the long session (its prefill then overlaps the others' decoding)."""
    if rnd == 0:
        return frozenset(range(1, sessions))
    lng = long_session(rnd, sessions)
    return frozenset() if lng is None or sessions < 2 else frozenset({lng})


def turn_kind(turn: int) -> str:
    """ "user" (a user message) or "tool" (a call of the previous answer, then its result)."""
    return "tool" if turn % 2 == 1 else "user"


# -- synthetic content, deterministic by seed

_WORDS = (
    "request cache token session model server prefill decode batch stream latency memory "
    "schema config module test error retry queue worker limit budget prompt answer tool file "
    "path line value field parse render chunk window ratio merge branch commit build"
).split()
_IDENTS = ("handler", "state", "items", "result", "config", "buffer", "index", "count", "name")


def _prose(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        s = " ".join(words).capitalize() + ". "
        out.append(s)
        n += len(s)
    return "".join(out)[:chars].rstrip()


def _code(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n, k = 0, 0
    while n < chars:
        a, b = rng.choice(_IDENTS), rng.choice(_IDENTS)
        k += 1
        s = (
            f"def {rng.choice(_WORDS)}_{a}_{k}({b}, limit={rng.randint(1, 512)}):\n"
            f"    {a} = [x for x in {b} if x < limit]\n"
            f"    return len({a}) + {rng.randint(0, 99)}\n\n"
        )
        out.append(s)
        n += len(s)
    return "".join(out)[:chars]


def system_prompt(chars: int) -> str:
    """The system prompt every session shares (no seed: the same text everywhere)."""
    head = (
        "You are a coding agent working in a Python repository. Use the tools to read, search "
        "and change files, run the tests, and answer briefly. "
    )
    return head + _prose(random.Random(0), max(0, chars - len(head)))


def _call(rng: random.Random, session: int, turn: int) -> tuple[dict[str, Any], str]:
    """A synthetic tool call (as an assistant's `tool_calls` entry) and its tool name."""
    name, args = rng.choice(
        (
            ("read_file", {"path": f"src/{rng.choice(_WORDS)}.py"}),
            ("grep", {"pattern": rng.choice(_WORDS), "glob": "*.py"}),
            ("run_tests", {"selector": f"tests/test_{rng.choice(_WORDS)}.py"}),
            ("list_dir", {"path": "src", "depth": 2}),
        )
    )
    call = {
        "id": f"call_{session}_{turn}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }
    return call, name


@dataclass
class Conversation:
    """One session's messages; new content by seed, answers as the server gave them."""

    shape: AgentShape
    session: int
    seed: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def _rng(self, turn: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + self.session * 1009 + turn)

    def add_turn(self, turn: int, long: bool) -> None:
        """Append turn `turn`'s messages: the previous answer (turn >= 1, with a tool call on a
        tool turn), then the new content (long: a file's worth)."""
        rng = self._rng(turn)
        sh = self.shape
        if turn == 0:
            self.messages = [
                {"role": "system", "content": system_prompt(sh.system_chars)},
                {
                    "role": "user",
                    "content": f"Session {self.session}: fix the failing test. "
                    + _prose(rng, sh.first_chars),
                },
            ]
            if long:
                self.messages[-1]["content"] += "\n\n" + _code(rng, sh.long_chars)
            return
        if len(self.answers) < turn:
            raise ValueError(f"turn {turn} needs the answer of turn {turn - 1}")
        answer: dict[str, Any] = {"role": "assistant", "content": self.answers[turn - 1]}
        size = sh.long_chars if long else sh.short_chars
        if turn_kind(turn) == "tool":
            call, name = _call(rng, self.session, turn)
            answer["tool_calls"] = [call]
            body = _code(rng, size) if long else _prose(rng, size)
            result = json.dumps({"tool": name, "ok": True, "output": body})
            self.messages += [
                answer,
                {"role": "tool", "tool_call_id": call["id"], "content": result},
            ]
        else:
            text = _prose(rng, sh.short_chars)
            if long:
                text += "\n\nHere is the file:\n" + _code(rng, sh.long_chars)
            self.messages += [answer, {"role": "user", "content": text}]

    def record_answer(self, text: str) -> None:
        self.answers.append(text)

    def body(self, max_tokens: int, tools: list[dict[str, Any]]) -> bytes:
        """The streaming request of the current turn: greedy, usage in the last chunk."""
        return orjson.dumps(
            {
                "messages": self.messages,
                "tools": tools,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )


def render_text(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]], bos: str
) -> str:
    """The prompt AGENT_TEMPLATE renders (its `tojson` is json.dumps with the default
    separators, as the chat templates' own filter), for sizing a run without a template engine."""
    out = [bos]
    if tools:
        out.append("<|start_header_id|>tools<|end_header_id|>\n\n")
        out += [json.dumps(t, ensure_ascii=False) + "\n" for t in tools]
        out.append("<|eot_id|>")
    for m in messages:
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m.get('content') or ''}")
        for c in m.get("tool_calls") or ():
            fn = {
                "name": c["function"]["name"],
                "arguments": json.loads(c["function"]["arguments"]),
            }
            out.append(f"<tool_call>{json.dumps(fn, ensure_ascii=False)}</tool_call>")
        out.append("<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def longest_prompt(shape: AgentShape, count: Callable[[str], int], answer: str) -> int:
    """Tokens (by `count`) of the longest last prompt of any session, every answer `answer`."""
    tools = tool_list(shape.descriptions)
    longest = 0
    for s in range(shape.sessions):
        conv = Conversation(shape, s)
        for t in range(shape.turns):
            conv.add_turn(t, long_session(t, shape.sessions) == s)
            conv.record_answer(answer)
        longest = max(longest, count(render_text(conv.messages, tools, "")))
    return longest


# -- the figures' pure parts


def reusable_prefix(prev_prompt: int, prev_completion: int, prompt: int) -> int:
    """Tokens this prompt shares with the previous turn's prompt and answer, estimated from the
    previous turn's usage (the answer re-rendered may differ at its edges by a token or two)."""
    return max(0, min(prev_prompt + prev_completion, prompt))


def hit_ratio(cached: int, reusable: int) -> Optional[float]:
    """Cached tokens over the reusable prefix; None where nothing was reusable."""
    return cached / reusable if reusable > 0 else None


def token_gaps(times: Sequence[float], tokens: int) -> list[tuple[float, float, float]]:
    """(start, end, per-token gap) between consecutive content events; an event carrying more
    than one token (tokens / events of them) splits its gap evenly."""
    per_event = tokens / len(times) if tokens and times else 1.0
    per_event = max(per_event, 1.0)
    return [(a, b, (b - a) / per_event) for a, b in zip(times, times[1:], strict=False)]


def split_gaps(
    gaps: Sequence[tuple[float, float, float]], windows: Sequence[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """(gaps overlapping a window, the others): a gap (a, b) meets window (s, f) when a < f and
    b > s, so a gap that spans the whole window (a stall) counts."""
    inside: list[float] = []
    steady: list[float] = []
    for a, b, g in gaps:
        (inside if any(a < f and b > s for s, f in windows) else steady).append(g)
    return inside, steady


# -- running


@dataclass
class TurnResult:
    """One session's turn on one server, as the client saw it (times: perf_counter)."""

    server: str
    session: int
    turn: int
    long: bool
    ok: bool
    error: Optional[str]
    sent: float
    first: Optional[float]
    end: float
    times: list[float]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: Optional[int]
    text: str
    tool_calls: int = 0

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first is None else self.first - self.sent

    @property
    def decode_tps(self) -> Optional[float]:
        """Tokens after the first over the time from the first to the last."""
        if len(self.times) < 2 or self.completion_tokens < 2:
            return None
        span = self.times[-1] - self.times[0]
        return (self.completion_tokens - 1) / span if span > 0 else None


async def stream_turn(
    client: httpx.AsyncClient,
    body: bytes,
    server: str,
    session: int,
    turn: int,
    long: bool,
    first_token: Optional[asyncio.Event] = None,
) -> TurnResult:
    """One streamed turn; sets `first_token` at the first content (or when it ends)."""
    sent = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    error: Optional[str] = None
    done = False
    calls = 0
    try:
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        ) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
            else:
                buf = b""
                async for chunk in r.aiter_raw():
                    now = time.perf_counter()
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        obj = orjson.loads(payload)
                        if "error" in obj:
                            error = str(obj["error"])[:200]
                        usage = obj.get("usage") or usage
                        for ch in obj.get("choices") or ():
                            delta = ch.get("delta") or {}
                            calls += len(delta.get("tool_calls") or ())
                            if delta.get("content"):
                                times.append(now)
                                pieces.append(delta["content"])
                                if first_token is not None:
                                    first_token.set()
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if first_token is not None:
            first_token.set()
    if error is None and not done:
        error = "stream ended without [DONE]"
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return TurnResult(
        server=server,
        session=session,
        turn=turn,
        long=long,
        ok=error is None,
        error=error,
        sent=sent,
        first=times[0] if times else None,
        end=time.perf_counter(),
        times=times,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=None if cached is None else int(cached),
        text="".join(pieces),
        tool_calls=calls,
    )


async def run_round(
    client: httpx.AsyncClient,
    server: str,
    convs: list[Conversation],
    rnd: int,
    max_tokens: int,
    tools: list[dict[str, Any]],
    timeout_s: float,
) -> list[TurnResult]:
    """Turn `rnd` of every session on one server; the long session sends once every other one
    has its first token (its prefill then overlaps their decoding)."""
    lng = long_session(rnd, len(convs))
    later = followers(rnd, len(convs))
    for s, conv in enumerate(convs):
        conv.add_turn(rnd, s == lng)
    firsts = {s: asyncio.Event() for s in range(len(convs)) if s not in later}

    async def one(s: int) -> TurnResult:
        if s in later:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(e.wait() for e in firsts.values())), timeout_s
                )
        body = convs[s].body(max_tokens, tools)
        return await stream_turn(client, body, server, s, rnd, s == lng, firsts.get(s))

    results = list(await asyncio.gather(*(one(s) for s in range(len(convs)))))
    for r in results:
        convs[r.session].record_answer(r.text)
    return results


async def run_scenario(
    urls: dict[str, str],
    shape: AgentShape,
    timeout_s: float,
    seed: int = 0,
    progress: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Every round on every server, interleaved; the raw results and each server's wall time."""
    tools = tool_list(shape.descriptions)
    convs = {n: [Conversation(shape, s, seed) for s in range(shape.sessions)] for n in urls}
    results: dict[str, list[TurnResult]] = {n: [] for n in urls}
    wall = {n: 0.0 for n in urls}
    names = [n for n in (APPLIANCE, MLX_SERVER) if n in urls]
    clients = {
        n: httpx.AsyncClient(
            base_url=u,
            trust_env=False,
            limits=httpx.Limits(max_connections=shape.sessions + 2),
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        )
        for n, u in urls.items()
    }
    try:
        for rnd in range(shape.turns):
            order = names if rnd % 2 == 0 else names[::-1]
            for n in order:
                t0 = time.perf_counter()
                rs = await run_round(
                    clients[n], n, convs[n], rnd, shape.max_tokens, tools, timeout_s
                )
                wall[n] += time.perf_counter() - t0
                results[n] += rs
                ok = [r for r in rs if r.ok]
                ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
                bad = len(rs) - len(ok)
                progress(
                    f"agent turn {rnd + 1}/{shape.turns} {n}: prompt "
                    f"{max((r.prompt_tokens for r in ok), default=0)} tokens max, cached "
                    f"{sum(r.cached_tokens or 0 for r in ok)} in all, TTFT p50 "
                    f"{(percentile(ttfts, 50) or 0) * 1000:.0f} ms"
                    + (f", {bad} failed: {rs[0].error if not rs[0].ok else ''}" if bad else "")
                )
                await asyncio.sleep(0.2)  # let the server settle before the other's round
    finally:
        for c in clients.values():
            await c.aclose()
    return {"results": results, "wall_s": wall}


async def _warm_up(url: str, timeout_s: float) -> None:
    """One short request without tools: kernels compiled, nothing of the scenario cached."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=timeout_s) as client:
        body = orjson.dumps(
            {
                "messages": [{"role": "user", "content": "Warm up."}],
                "max_tokens": 4,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        r = await stream_turn(client, body, url, 0, 0, False)
        if not r.ok:
            raise RuntimeError(f"warm-up request to {url} failed: {r.error}")


def add_agent_args(p: argparse.ArgumentParser) -> None:
    """The agent scenario's options of `python -m benchmarks`."""
    p.add_argument(
        "--agent",
        action="store_true",
        help="run the agent scenario (sessions of growing tool-using conversations) instead",
    )
    p.add_argument(
        "--agent-shape",
        choices=sorted(SHAPES),
        help="agent sizes: demo (CPU, the demo model) or 1b (the 1B shape, contexts to 32k); "
        "implies --agent (default: demo, or 1b with --shape llama-1b)",
    )
    p.add_argument("--agent-sessions", type=int, help="concurrent sessions (default by shape)")
    p.add_argument("--agent-turns", type=int, help="turns per session (default by shape)")
    p.add_argument(
        "--agent-peer",
        choices=("yes", "no"),
        default="yes",
        help="also run mlx_lm.server (default yes)",
    )


def wants_agent(args: argparse.Namespace) -> bool:
    """Whether the command line asks for the agent scenario."""
    return bool(getattr(args, "agent", False) or getattr(args, "agent_shape", None))


def shape_from(args: argparse.Namespace) -> AgentShape:
    """The run's shape: by --agent-shape (or --shape), then sessions, turns, max tokens."""
    name = args.agent_shape or ("1b" if args.shape == "llama-1b" else "demo")
    shape = SHAPES[name]
    shape = replace(
        shape,
        sessions=args.agent_sessions or shape.sessions,
        turns=args.agent_turns or shape.turns,
        max_tokens=args.max_tokens or shape.max_tokens,
    )
    if shape.sessions < 1 or shape.turns < 1 or shape.max_tokens < 1:
        raise SystemExit("--agent-sessions, --agent-turns and --max-tokens must be >= 1")
    return shape


def _check_fits(shape: AgentShape, model: Path) -> int:
    """The longest last prompt in tokens of the model's tokenizer, answers of max_tokens words;
    exits when it and an answer cannot fit the shape's context."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    answer = " ".join(_WORDS[i % len(_WORDS)] for i in range(shape.max_tokens))
    tokens = longest_prompt(shape, lambda text: len(tok.encode(text).ids), answer)
    if tokens + shape.max_tokens > shape.context_length:
        raise SystemExit(
            f"agent shape {shape.name}: the longest prompt may reach about {tokens} tokens, "
            f"more than the context of {shape.context_length}: fewer turns or sessions"
        )
    return tokens


def run_agent(args: argparse.Namespace) -> int:
    """`python -m benchmarks --agent ...`: start the servers, run the scenario, write the JSON
    (with its `agent` section) and the chart; the exit status."""
    from benchmarks.agent_report import agent_chart, agent_tables, summarize
    from benchmarks.bench import _sigterm_as_interrupt, plan_from
    from benchmarks.peers import start_appliance, start_mlx_server
    from benchmarks.procs import Procs
    from benchmarks.report import machine_info

    shape = shape_from(args)
    if shape.name == "1b" and args.model_path is None:
        args.shape = "llama-1b"
    args.concurrency = [shape.sessions]
    args.max_tokens = shape.max_tokens
    plan = plan_from(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    estimate = _check_fits(shape, plan.model_path)
    res: dict[str, Any] = {
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "machine": machine_info(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    procs = Procs()
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="appliance-agent-") as tmp:
        work = Path(tmp)
        try:
            model = agent_model(plan.model_path, work / "agent-model")
            aplan: Plan = replace(
                plan,
                model_path=model,
                appliance_args=[
                    *plan.appliance_args,
                    f"++models.catalog.demo.context_length={shape.context_length}",
                ],
            )
            say(
                f"agent shape {shape.name}: {shape.sessions} sessions x {shape.turns} turns, "
                f"longest prompt about {estimate} tokens; model {plan.model_label}"
            )
            app, app_url, _ = start_appliance(aplan, procs, work, "appliance")
            urls = {APPLIANCE: app_url}
            say(f"appliance ready (pid {app.pid}, {app_url})")
            if args.agent_peer == "yes":
                mlx, mlx_url = start_mlx_server(aplan, procs, work)
                urls[MLX_SERVER] = mlx_url
                say(f"mlx_lm.server up (pid {mlx.pid}, {mlx_url})")
            for n in SERVERS:
                if n in urls:
                    asyncio.run(_warm_up(urls[n], plan.timeout_s))
            raw = asyncio.run(run_scenario(urls, shape, plan.timeout_s))
        except KeyboardInterrupt:
            say("interrupted; stopping every process the bench started")
            return 130
        finally:
            procs.stop_all()
    res["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    res["agent"] = summarize(raw, shape, estimate)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = agent_tables(res)
    res["table_markdown"] = text
    res["chart"] = None
    if plan.chart:
        png = plan.out / f"bench-agent-{stamp}.png"
        try:
            agent_chart(res, png)
            res["chart"] = str(png)
        except Exception as exc:  # no matplotlib, no fonts: the figures matter more than the PNG
            say(f"no chart: {type(exc).__name__}: {exc}")
    json_path = plan.out / f"bench-agent-{stamp}.json"
    json_path.write_text(json.dumps(res, indent=2, default=str))
    print(text)
    print(f"\nJSON: {json_path}")
    if res["chart"]:
        print(f"chart: {res['chart']}")
    return 0
