"""Grammar-constrained generation on the real demo model, inside mlx-lm's BatchGenerator and the
appliance's subclass: constrained and unconstrained rows share the batch. The demo model's text
is meaningless, so the grammar is all that makes the output valid; the unconstrained rows must
come out exactly as they do without constrained neighbours."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Optional

import jsonschema
import pytest

from appliance.engine import constraints as C
from appliance.engine.mlx_ext import batching
from appliance.engine.sampling import make_sampler
from appliance.engine.types import SamplingParams

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

G: Any = importlib.import_module("mlx_lm.generate")
CLASSES = {"mlx-lm": lambda: G.BatchGenerator, "appliance": lambda: batching.BatchGenerator}
MAX_TOKENS = 256


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _str(n: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": n}


def _obj(props: dict[str, Any], required: Optional[list[str]] = None, **kw: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        **kw,
    }


SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": _str(12), "age": _int(0, 120), "nick": _str(6)}, ["name", "age"]),
    _obj(
        {
            "user": _obj(
                {
                    "id": _int(1, 9999),
                    "address": _obj(
                        {"city": _str(10), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
                    ),
                }
            )
        }
    ),
    _obj({"tags": {"type": "array", "items": _str(5), "minItems": 2, "maxItems": 4}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", 42, None]}}),
    _obj(
        {
            "t": {"type": "number", "minimum": -10.5, "maximum": 40},
            "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
            "m": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
        }
    ),
    _obj(
        {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
            "word": {"type": "string", "minLength": 3, "maxLength": 8},
        }
    ),
    _obj({"value": {"anyOf": [_int(0, 99), _str(4), {"type": "null"}]}}),
    _obj(
        {
            "shape": {
                "anyOf": [
                    _obj({"kind": {"const": "circle"}, "r": _int(1, 9)}),
                    _obj({"kind": {"const": "square"}, "side": _int(1, 9)}),
                ]
            }
        }
    ),
    _obj(
        {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": _obj(
                    {"sku": {"type": "string", "pattern": "^[a-z0-9]{4}$"}, "qty": _int(1, 50)}
                ),
            }
        }
    ),
    _obj({"ok": {"type": "boolean"}, "version": {"const": 2}, "mode": {"const": "fast"}}),
    {"type": "array", "items": _int(-5, 5), "minItems": 3, "maxItems": 6},
    {"enum": ["yes", "no", "maybe"]},
    {
        **_obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}),
        "$defs": {"point": _obj({"x": _int(0, 9), "y": _int(0, 9)})},
    },
    _obj(
        {
            "note": {"type": ["string", "null"], "maxLength": 8},
            "score": {"type": ["integer", "null"], "minimum": 0, "maximum": 10},
        }
    ),
    _obj({"day": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}}),
    {
        "type": "array",
        "prefixItems": [_str(4), _int(0, 9), {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    _obj(
        {
            "a": _obj(
                {
                    "b": _obj(
                        {
                            "c": _obj(
                                {
                                    "d": {
                                        "type": "array",
                                        "items": {"enum": [1, 2, 3]},
                                        "minItems": 1,
                                        "maxItems": 2,
                                    }
                                }
                            )
                        }
                    )
                }
            )
        }
    ),
    {"allOf": [_obj({"a": _int(0, 9)}), _obj({"b": {"type": "boolean"}})]},
    {
        "type": "object",
        "patternProperties": {"^[a-z]{1,3}$": _int(0, 9)},
        "additionalProperties": False,
        "maxProperties": 3,
    },
    _obj({"x": _int(0, 9), "y": _str(3)}, []),
    _obj(
        {"location": _str(20), "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        additionalProperties=False,
    ),
    _obj(
        {
            "days": {
                "type": "array",
                "items": {"enum": ["mon", "tue", "wed"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "temps": {
                "type": "array",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "maxItems": 2,
            },
        }
    ),
    _obj({"email": {"type": "string", "format": "email", "maxLength": 24}}),
    {"type": "integer", "minimum": 100, "maximum": 200},
]


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> tuple[Any, Any]:
    from mlx_lm.utils import load

    model, tokenizer = load(str(demo_model_dir))
    return model, tokenizer


def _run(
    cls: Any, model: Any, tok: Any, rows: list[dict[str, Any]], completion_batch_size: int = 32
) -> dict[int, tuple[list[int], str]]:
    """Insert each row at its step (`at`), run to the end; per row index: (tokens without the
    end token, finish reason)."""
    gen = cls(
        model,
        stop_tokens=[[t] for t in sorted(tok.eos_token_ids)],
        completion_batch_size=completion_batch_size,
        prefill_batch_size=8,
    )
    by_uid: dict[int, int] = {}
    out: dict[int, tuple[list[int], str]] = {}
    tokens: dict[int, list[int]] = {}
    pending = sorted(range(len(rows)), key=lambda i: rows[i].get("at", 0))
    for step in range(2000):
        while pending and rows[pending[0]].get("at", 0) <= step:
            i = pending.pop(0)
            r = rows[i]
            (uid,) = gen.insert(
                [tok.encode(r["prompt"])],
                max_tokens=[r.get("max", MAX_TOKENS)],
                samplers=[r.get("sampler")],
                logits_processors=[[r["proc"]] if "proc" in r else []],
            )
            by_uid[uid] = i
            tokens[uid] = []
        if not pending and len(out) == len(rows):
            break
        _, responses = gen.next()
        for resp in responses:
            if resp.finish_reason != "stop":  # the end token is not part of the text
                tokens[resp.uid].append(resp.token)
            if resp.finish_reason is not None:
                out[by_uid[resp.uid]] = (tokens[resp.uid], resp.finish_reason)
    gen.close()
    assert len(out) == len(rows)
    return out


def _proc(tok: Any, grammar: C.Grammar) -> C.GrammarProcessor:
    return C.make_processor(C.Constraint(grammar, param="response_format"), tok)


PLAIN = ["Once upon a time", "The weather in Paris is", "Tell me about MLX", "x"]


@pytest.mark.parametrize("which", sorted(CLASSES))
def test_schemas_beside_unconstrained_rows(which: str, loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    cls = CLASSES[which]()
    rows: list[dict[str, Any]] = []
    for i, schema in enumerate(SCHEMAS):
        row: dict[str, Any] = {
            "prompt": f"Request {i}: answer in JSON",
            "schema": schema,
            "proc": _proc(tok, C.json_schema(schema, strict=True)),
            "at": (i % 4) * 3,
        }  # joins while others decode
        if i % 3 == 1:  # some sample, seeded, through the worker's sampler
            row["sampler"] = make_sampler(SamplingParams(temperature=0.9, top_p=0.95, seed=i))
        rows.append(row)
    plain = [{"prompt": p, "max": 40, "at": k} for k, p in enumerate(PLAIN)]
    mixed = _run(cls, model, tok, plain + rows)
    alone = _run(cls, model, tok, plain)

    for k in range(len(plain)):  # greedy rows: the same tokens with or without neighbours
        assert mixed[k] == alone[k], PLAIN[k]
    for j, row in enumerate(rows):
        toks, finish = mixed[len(plain) + j]
        text = tok.decode(toks)
        assert finish == "stop", (j, text)
        jsonschema.validate(json.loads(text), row["schema"])
        assert row["proc"].finished and row["proc"].error is None
        assert len(toks) < 120, (j, text)  # compact: a small object ends quickly


def test_open_schema_and_json_object(loaded: tuple[Any, Any]) -> None:
    """Not strict (JSON Schema's open objects) and OpenAI's json_object: a key or a string may be
    any length, and on a model that means nothing some run to the budget ("length"); every one
    that ends is an object that validates."""
    model, tok = loaded
    open_schema = _obj({"a": _int(0, 9)}, ["a"])
    rows = []
    for s in range(8):
        sampler = make_sampler(SamplingParams(temperature=0.7, seed=s)) if s else None
        rows.append(
            {
                "prompt": f"json please {s}",
                "max": 300,
                "sampler": sampler,
                "proc": _proc(tok, C.json_object()),
            }
        )
        rows.append(
            {
                "prompt": f"object {s}",
                "max": 300,
                "sampler": sampler,
                "proc": _proc(tok, C.json_schema(open_schema, strict=False)),
            }
        )
    out = _run(batching.BatchGenerator, model, tok, rows)
    ended = 0
    for i in range(len(rows)):
        toks, finish = out[i]
        if finish == "length":
            assert len(toks) == 300 and not rows[i]["proc"].finished
            continue
        assert finish == "stop"
        ended += 1
        value = json.loads(tok.decode(toks))
        assert isinstance(value, dict)
        if i % 2:
            jsonschema.validate(value, open_schema)
    assert ended >= len(rows) // 3


def test_tool_call_grammar(loaded: tuple[Any, Any]) -> None:
    """A Lark tool-call grammar with inline %json (what the tool-call formats produce)."""
    model, tok = loaded
    weather = _obj({"city": _str(12), "unit": {"enum": ["c", "f"]}})
    clock = _obj({"tz": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}/[A-Z][a-z]{1,8}$"}})
    grammar = C.lark(
        'start: "<tool_call>" (weather | clock) "</tool_call>"\n'
        'weather: "{\\"name\\":\\"get_weather\\",\\"arguments\\":" '
        + C.json_fragment(weather, strict=True)
        + ' "}"\n'
        'clock: "{\\"name\\":\\"get_time\\",\\"arguments\\":" '
        + C.json_fragment(clock, strict=True)
        + ' "}"\n',
        param="tools",
    )
    rows = [
        {
            "prompt": f"call a tool {s}",
            "proc": _proc(tok, grammar),
            "sampler": make_sampler(SamplingParams(temperature=1.0, seed=s)),
        }
        for s in range(6)
    ]
    out = _run(batching.BatchGenerator, model, tok, rows)
    names = set()
    for i in range(len(rows)):
        toks, finish = out[i]
        text = tok.decode(toks)
        assert finish == "stop" and text.startswith("<tool_call>") and text.endswith("</tool_call>")
        call = json.loads(text[len("<tool_call>") : -len("</tool_call>")])
        names.add(call["name"])
        jsonschema.validate(call["arguments"], weather if call["name"] == "get_weather" else clock)
    assert names <= {"get_weather", "get_time"}


def test_max_tokens_cut_is_length(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    schema = {"type": "array", "items": _int(0, 9), "minItems": 30}
    rows = [
        {"prompt": "numbers", "max": 8, "proc": _proc(tok, C.json_schema(schema, strict=True))},
        {"prompt": "numbers", "max": 120, "proc": _proc(tok, C.json_schema(schema, strict=True))},
    ]
    out = _run(batching.BatchGenerator, model, tok, rows)
    assert out[0][1] == "length" and len(out[0][0]) == 8
    assert out[1][1] == "stop"
    jsonschema.validate(json.loads(tok.decode(out[1][0])), schema)
