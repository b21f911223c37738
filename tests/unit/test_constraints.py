"""appliance.engine.constraints without a model: grammar sources and their errors, the tokenizer
bridge, and the logits processor driven by seeded random logits (the grammar alone makes the
output valid), on the demo tokenizer and on a 49152-token byte-level BPE."""

from __future__ import annotations

import json
import pickle
import random
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance.engine import constraints as C
from appliance.errors import InvalidRequest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def demo_tok(demo_model_dir: Path) -> Any:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(demo_model_dir)


def _big_tokenizer(n: int = 49152) -> Any:
    """A byte-level BPE of exactly n tokens (SmolLM2's size), merges drawn at random."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    common = [c for c in base if c.isalnum() or c in 'Ġ"{}:,[]._-']
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(base)}}
    merges, pieces = [], list(base)
    while len(vocab) < n:
        a, b = rng.choice(pieces if rng.random() < 0.5 else common), rng.choice(common)
        if a + b not in vocab and len(a + b) <= 12:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            pieces.append(a + b)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    return TokenizerWrapper(hf, eos_token_ids=[0])


@pytest.fixture(scope="module")
def big_tok() -> Any:
    return _big_tokenizer()


def _matcher(tok: Any, grammar: C.Grammar) -> Any:
    return C.TokenizerBridge.for_tokenizer(tok).matcher(grammar)


def _accepts(tok: Any, grammar: C.Grammar, text: str) -> bool:
    """Whether the grammar takes `text` whole (tokenized as the model would)."""
    m = _matcher(tok, grammar)
    ids = tok._tokenizer.encode(text, add_special_tokens=False)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def _generate(
    tok: Any,
    constraint: C.Constraint,
    *,
    seed: int,
    max_tokens: int = 300,
    vocab_size: int | None = None,
) -> tuple[str, C.GrammarProcessor, str]:
    """Greedy over seeded random logits through the processor, as BatchGenerator calls it:
    (text, processor, "stop" | "length")."""
    import mlx.core as mx

    proc = C.make_processor(constraint, tok, vocab_size=vocab_size)
    width = vocab_size or len(tok._tokenizer)
    key = mx.random.key(seed)
    context = [5, 6, 7]  # a prompt
    out: list[int] = []
    for _ in range(max_tokens):
        key, sub = mx.random.split(key)
        logits = mx.random.normal((1, width), key=sub) * 4
        token = int(mx.argmax(proc(mx.array(context), logits), axis=-1).item())
        if token in tok.eos_token_ids:
            proc(mx.array(context + [token]), logits)  # the step that feeds it
            return tok.decode(out), proc, "stop"
        out.append(token)
        context.append(token)
    return tok.decode(out), proc, "length"


# -- grammar sources


def test_json_is_compact(demo_tok: Any) -> None:
    g = C.json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
        strict=True,
    )
    assert g.kind == "json_schema"
    assert _accepts(demo_tok, g, '{"a":1,"b":"x"}')
    assert _accepts(demo_tok, g, '{"a": 1, "b": "x"}')  # one space after a separator
    assert not _accepts(demo_tok, g, '{"a":  1}')
    assert not _accepts(demo_tok, g, '{ "a":1}')
    assert not _accepts(demo_tok, g, '{"a":1}\n')
    # the schema's own x-guidance can't switch the whitespace back on
    loose = C.json_schema(
        {"type": "object", "x-guidance": {"whitespace_flexible": True}}, strict=False
    )
    assert not _accepts(demo_tok, loose, "{ }")


def test_strict_closes_objects(demo_tok: Any) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert _accepts(demo_tok, C.json_schema(schema, strict=False), '{"a":1,"zz":2}')
    assert not _accepts(demo_tok, C.json_schema(schema, strict=True), '{"a":1,"zz":2}')
    assert schema == {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
    }  # the caller's schema is not changed
    # nested, in arrays, in anyOf branches and $defs too
    nested = {
        "type": "object",
        "properties": {
            "xs": {
                "type": "array",
                "items": {
                    "anyOf": [
                        {"type": "object", "properties": {"k": {"$ref": "#/$defs/k"}}},
                        {"type": "null"},
                    ]
                },
            }
        },
        "$defs": {"k": {"type": "object", "properties": {"v": {"type": "integer"}}}},
    }
    g = C.json_schema(nested, strict=True)
    assert _accepts(demo_tok, g, '{"xs":[{"k":{"v":1}},null]}')
    assert not _accepts(demo_tok, g, '{"xs":[{"k":{"v":1,"w":2}}]}')
    assert not _accepts(demo_tok, g, '{"xs":[{"j":1}]}')
    # allOf members are not closed one by one: together they still allow both properties
    both = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            {"type": "object", "properties": {"b": {"type": "integer"}}},
        ],
        "required": ["a", "b"],
    }
    assert _accepts(demo_tok, C.json_schema(both, strict=True), '{"a":1,"b":2}')


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "strin"}, "strin"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}}, "nope"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, ""),
        ("not a schema", "JSON Schema object"),
        ({"type": "object", "default": {1, 2}}, "plain JSON"),
    ],
)
def test_rejected_schema_names_the_field(schema: Any, fragment: str) -> None:
    param = "tools[2].function.parameters"
    with pytest.raises(InvalidRequest) as info:
        C.json_schema(schema, strict=True, param=param)
    assert info.value.param == param
    assert info.value.message.startswith(param)
    assert fragment in info.value.message


def test_json_object(demo_tok: Any) -> None:
    g = C.json_object()
    assert g.kind == "json_object"
    assert _accepts(demo_tok, g, '{"any":[1,{"x":null}]}')
    assert not _accepts(demo_tok, g, "[1]")
    assert not _accepts(demo_tok, g, '"s"')


TOOL_GRAMMAR = r"""
start: "<tool_call>" call "</tool_call>"
call: %json {"type": "object", "properties": {"name": {"const": "get_weather"},
      "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
      "required": ["city"], "additionalProperties": false}},
      "required": ["name", "arguments"], "additionalProperties": false}
"""


def test_lark_with_inline_json(demo_tok: Any) -> None:
    g = C.lark(TOOL_GRAMMAR, param="tools")
    assert g.kind == "lark"
    ok = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert _accepts(demo_tok, g, ok)
    assert not _accepts(demo_tok, g, ok.replace("get_weather", "get_time"))
    # json_fragment gives the same compact JSON inside a Lark grammar
    frag = C.json_fragment(
        {"type": "object", "properties": {"city": {"type": "string"}}}, strict=True
    )
    g2 = C.lark(f'start: "<tool_call>" args "</tool_call>"\nargs: {frag}')
    assert _accepts(demo_tok, g2, '<tool_call>{"city":"Oslo"}</tool_call>')
    assert not _accepts(demo_tok, g2, '<tool_call>{ "city":"Oslo"}</tool_call>')
    assert not _accepts(demo_tok, g2, '<tool_call>{"city":"Oslo","x":1}</tool_call>')


def test_lark_and_regex_errors(demo_tok: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        C.lark('start: "a" b', param="grammar")
    assert info.value.param == "grammar" and "unknown name" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        C.lark('start: "a" %json {"type": "strin"}', param="tools[0].function.parameters")
    assert "strin" in info.value.message
    with pytest.raises(InvalidRequest):
        C.lark("   ", param="grammar")
    # a special token only the model's tokenizer can check
    bridge = C.TokenizerBridge.for_tokenizer(demo_tok)
    C.lark('start: <|eot_id|> "x"', tokenizer=bridge)
    with pytest.raises(InvalidRequest) as info:
        C.lark('start: <|python_tag|> "x"', param="grammar", tokenizer=bridge)
    assert info.value.param == "grammar"
    g = C.regex(r"[0-9]{3}-[a-z]+", param="pattern")
    assert _accepts(demo_tok, g, "123-abc") and not _accepts(demo_tok, g, "12-abc")
    with pytest.raises(InvalidRequest) as info:
        C.regex("a(", param="pattern")
    assert info.value.param == "pattern" and "unclosed" in info.value.message


def test_constraint_pickles(demo_tok: Any) -> None:
    c = C.Constraint(
        C.json_schema(
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            strict=True,
        ),
        param="response_format.json_schema.schema",
    )
    back = pickle.loads(pickle.dumps(c))
    assert back == c
    text, _, finish = _generate(demo_tok, back, seed=1)
    assert finish == "stop" and isinstance(json.loads(text)["n"], int)


# -- the bridge


def test_bridge_is_built_once(demo_tok: Any, big_tok: Any) -> None:
    a = C.TokenizerBridge.for_tokenizer(demo_tok)
    assert C.TokenizerBridge.for_tokenizer(demo_tok) is a
    assert a.eos_token == demo_tok.eos_token_id
    assert sorted(a.ll.eos_tokens) == sorted(demo_tok.eos_token_ids)
    assert a.vocab_size == len(demo_tok._tokenizer)
    padded = C.TokenizerBridge.for_tokenizer(demo_tok, vocab_size=a.vocab_size + 64)
    assert padded is not a and padded.vocab_size == a.vocab_size + 64
    big = C.TokenizerBridge.for_tokenizer(big_tok)
    assert big.vocab_size == 49152 and big.eos_token == 0
    assert big.build_s < 10


# -- the processor


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "ok"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{1,5}$"},
                "minItems": 1,
                "maxItems": 3,
            },
            "kind": {"enum": ["a", "b", None]},
        },
        "required": ["tags", "kind"],
    },
    {
        "type": "array",
        "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "minItems": 2,
        "maxItems": 2,
    },
]


@pytest.mark.parametrize("which", ["demo", "big"])
def test_processor_output_is_valid(which: str, demo_tok: Any, big_tok: Any) -> None:
    tok = demo_tok if which == "demo" else big_tok
    for i, schema in enumerate(SCHEMAS):
        for seed in range(3):
            c = C.Constraint(C.json_schema(schema, strict=True))
            text, proc, finish = _generate(tok, c, seed=100 * i + seed)
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), schema)
            assert proc.finished and proc.error is None and proc.exception() is None


def test_processor_with_wider_logits(demo_tok: Any) -> None:
    """A model whose logits are wider than the tokenizer (padded embeddings): the extra ids are
    never allowed."""
    c = C.Constraint(C.json_schema(SCHEMAS[0], strict=True))
    width = len(demo_tok._tokenizer) + 100
    text, _, finish = _generate(demo_tok, c, seed=3, vocab_size=width)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_max_tokens_cut_is_length(demo_tok: Any) -> None:
    c = C.Constraint(
        C.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 50}, strict=True)
    )
    _, proc, finish = _generate(demo_tok, c, seed=0, max_tokens=10)
    assert finish == "length" and not proc.finished and proc.error is None


def test_matcher_error_ends_the_row(demo_tok: Any) -> None:
    """A token the grammar did not allow (nothing here samples one; a caller's bug would):
    the matcher fails, only the end token is allowed from then on, and the error names the
    field."""
    import mlx.core as mx

    c = C.Constraint(C.json_schema({"type": "object"}, strict=True), param="response_format")
    proc = C.make_processor(c, demo_tok)
    width = len(demo_tok._tokenizer)
    logits = mx.zeros((1, width))
    first = proc(mx.array([5]), logits)
    allowed = [t for t in range(width) if float(first[0, t].item()) > -1e30]
    bad = next(t for t in range(width) if t not in allowed and t not in demo_tok.eos_token_ids)
    out = proc(mx.array([5, bad]), logits)
    finite = [t for t in range(width) if float(out[0, t].item()) > -1e30]
    assert finite == [demo_tok.eos_token_id]
    assert proc.error and not proc.finished
    exc = proc.exception()
    assert isinstance(exc, InvalidRequest) and exc.param == "response_format"


def test_processor_uses_no_metal_kernel_here(demo_tok: Any) -> None:
    import mlx.core as mx

    proc = C.make_processor(C.Constraint(C.json_object()), demo_tok)
    assert proc._metal == bool(mx.metal.is_available())  # the kernel only where Metal runs


def test_mask_cost_on_a_49k_vocabulary(big_tok: Any) -> None:
    """Consume + mask + apply per token on a 49152-token vocabulary stays well under a few
    milliseconds (benchmarks/constraints_cost.py measures it properly)."""
    import mlx.core as mx

    c = C.Constraint(C.json_schema(SCHEMAS[1], strict=True))
    proc = C.make_processor(c, big_tok)
    logits = mx.random.normal((1, 49152), key=mx.random.key(0))
    mx.eval(logits)
    context = [5]
    spent = []
    for _ in range(40):
        t0 = time.perf_counter()
        out = proc(mx.array(context), logits)
        token = int(mx.argmax(out, axis=-1).item())
        spent.append(time.perf_counter() - t0)
        if token == 0:
            break
        context.append(token)
    spent.sort()
    assert spent[len(spent) // 2] < 0.005, spent
