"""Helpers for the output-parser tests: feeding with chunkings, and events normalised."""

from __future__ import annotations

import json
import random
from typing import Any, Iterable, Optional, Sequence

from appliance.engine.output import (
    Event,
    OutputParser,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
)


def counter_ids() -> Any:
    n = iter(range(1_000_000))
    return lambda: f"call_{next(n)}"


def feed(parser: OutputParser, pieces: Iterable[str]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.close()
    return events


def chunkings(text: str, seed: int = 0, n: int = 6) -> list[list[str]]:
    """The text whole, character by character, and `n` random chunkings."""
    out = [[text], list(text)]
    rng = random.Random(seed)
    for _ in range(n):
        pieces, i = [], 0
        while i < len(text):
            k = rng.randint(1, 7)
            pieces.append(text[i : i + k])
            i += k
        out.append(pieces)
    return out


def merged(events: Sequence[Event]) -> list[Event]:
    """Adjacent events of one kind merged: what is the same whatever the chunking."""
    out: list[Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, Text) and isinstance(last, Text):
            out[-1] = Text(last.text + ev.text)
        elif isinstance(ev, Reasoning) and isinstance(last, Reasoning):
            out[-1] = Reasoning(last.text + ev.text)
        elif (
            isinstance(ev, ToolCallArgs)
            and isinstance(last, ToolCallArgs)
            and last.index == ev.index
        ):
            out[-1] = ToolCallArgs(ev.index, last.delta + ev.delta)
        else:
            out.append(ev)
    return out


def check_calls(events: Sequence[Event]) -> None:
    """Each call: Start, Args..., End contiguous; deltas concatenate to a JSON object text."""
    i = 0
    expect = 0
    while i < len(events):
        ev = events[i]
        assert not isinstance(ev, (ToolCallArgs, ToolCallEnd)), f"stray {ev}"
        if isinstance(ev, ToolCallStart):
            assert ev.index == expect
            expect += 1
            deltas = []
            i += 1
            while isinstance(events[i], ToolCallArgs):
                assert events[i].index == ev.index
                deltas.append(events[i].delta)
                i += 1
            end = events[i]
            assert isinstance(end, ToolCallEnd) and end.index == ev.index, end
            assert "".join(deltas) == end.arguments
            assert isinstance(json.loads(end.arguments), dict), end.arguments
        i += 1


def summary(events: Sequence[Event]) -> list[tuple[str, Any]]:
    """("text", s), ("reasoning", s), ("call", name, arguments as a dict) in order."""
    out: list[tuple[str, Any]] = []
    names: dict[int, str] = {}
    for ev in merged(events):
        if isinstance(ev, Text):
            out.append(("text", ev.text))
        elif isinstance(ev, Reasoning):
            out.append(("reasoning", ev.text))
        elif isinstance(ev, ToolCallStart):
            names[ev.index] = ev.name
        elif isinstance(ev, ToolCallEnd):
            out.append(("call", names[ev.index], json.loads(ev.arguments)))
    return out


def parse_all(
    family: Any,
    text: str,
    *,
    tools: Sequence[Any] = (),
    reasoning: Any = None,
    tools_enabled: bool = True,
    seed: int = 0,
) -> list[tuple[str, Any]]:
    """Parses `text` under every chunking; asserts they agree; returns the summary."""
    results = []
    for pieces in chunkings(text, seed):
        p = OutputParser(
            family,
            tools_enabled=tools_enabled,
            reasoning=reasoning,
            tools=tools,
            id_factory=counter_ids(),
        )
        events = feed(p, pieces)
        check_calls(events)
        results.append((merged(events), p.calls))
    first = results[0]
    for r in results[1:]:
        assert r == first, f"chunking changed the events:\n{first}\n{r}"
    return summary(first[0])


def calls_only(summary_: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(s[1], s[2]) for s in summary_ if s[0] == "call"]


def text_of(summary_: Sequence[tuple[str, Any]], kind: str = "text") -> Optional[str]:
    parts = [s[1] for s in summary_ if s[0] == kind]
    return "".join(parts) if parts else None


def demo_tokenizer_file() -> str:
    from appliance.engine.demo import ensure_demo_model

    return str(ensure_demo_model(None) / "tokenizer.json")


def hf_tokenizer(
    chat_template: Optional[str] = None,
    special: Sequence[str] = (),
    added: Sequence[str] = (),
) -> Any:
    """The demo model's byte-level BPE as a transformers tokenizer, with `special` tokens and
    `added` (non-special) tokens of a family added, and a chat template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_file(demo_tokenizer_file())
    if special:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if added:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
