"""Grammar-constrained sampling: JSON schemas, JSON objects, Lark grammars and regexes, enforced
per sequence inside the running batch with llguidance.

A request's grammar is compiled and checked when the request is parsed (`json_schema`, `lark`,
...: a schema the compiler rejects is an InvalidRequest naming the field, before any generation).
The compiled `Grammar` travels in a `Constraint`, a small frozen value that pickles (requests
cross to an engine process as pickles). At insert time the worker turns it into a
`GrammarProcessor`, one per sequence, passed to mlx-lm's `BatchGenerator.insert(...,
logits_processors=[[proc]])`: constrained and unconstrained rows share every step, and a row
without a processor is not touched.

Each step the processor consumes the token sampled for its row at the step before, computes the
allowed-token bitmask with llguidance and sets every other logit to -inf. Once the grammar is
complete (or the matcher fails) only the model's end-of-sequence token is allowed, so the row ends
through the batch's stop tokens: finish "stop"; a max_tokens cut is still "length".

JSON is generated compact (no whitespace except one optional space after `,` and `:`), so even a
tiny model finishes a small object quickly; with `strict` every object schema that lists
`properties` and says nothing about others gets `additionalProperties: false` (OpenAI's strict
mode requires exactly that of every object).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidRequest

__all__ = [
    "JSON_OPTIONS",
    "Constraint",
    "Grammar",
    "GrammarProcessor",
    "TokenizerBridge",
    "json_fragment",
    "json_object",
    "json_schema",
    "lark",
    "make_processor",
    "regex",
]

# llguidance's JSON compiler options, applied over anything the schema's own "x-guidance" says:
# no free whitespace (a model could otherwise pad forever), at most one space after separators.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ?",
    "key_separator": ": ?",
}
MAX_MESSAGE = 600  # longest compiler message quoted back to the client
MATCHER_CACHE = 64  # pristine compiled matchers kept per tokenizer (agents repeat their tools)


@dataclass(frozen=True)
class Grammar:
    """A grammar the compiler accepted: llguidance's serialized form and the kind it came from
    (json_schema, json_object, lark, regex)."""

    text: str
    kind: str


@dataclass(frozen=True)
class Constraint:
    """What the worker needs to constrain one sequence: the compiled grammar and the request
    field it came from (errors found at insert time or while generating name it)."""

    grammar: Grammar
    param: Optional[str] = None


# -- grammar sources (called while parsing a request: no model, no MLX)


def json_schema(
    schema: Any,
    *,
    strict: bool,
    param: Optional[str] = "response_format.json_schema.schema",
    tokenizer: Optional[TokenizerBridge] = None,
) -> Grammar:
    """A grammar for JSON documents valid against `schema` (a JSON Schema object).

    `strict`: objects that list `properties` and say nothing of others take no others.
    Raises InvalidRequest naming `param` when the schema is malformed or uses a feature the
    compiler does not support. `tokenizer` (optional) checks against the model's tokens too."""
    doc = _schema_doc(schema, param)
    if strict:
        close_objects(doc)
    from llguidance import LLMatcher

    try:
        text = LLMatcher.grammar_from_json_schema(doc, overrides=dict(JSON_OPTIONS))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise _invalid(param, "is not a usable JSON Schema", str(exc)) from None
    _validate(text, param, "is not a usable JSON Schema", tokenizer)
    return Grammar(text, "json_schema")


def json_object(
    *, param: Optional[str] = "response_format", tokenizer: Optional[TokenizerBridge] = None
) -> Grammar:
    """A grammar for any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    g = json_schema({"type": "object"}, strict=False, param=param, tokenizer=tokenizer)
    return Grammar(g.text, "json_object")


def lark(
    text: str, *, param: Optional[str] = None, tokenizer: Optional[TokenizerBridge] = None
) -> Grammar:
    """A grammar in llguidance's Lark dialect (inline `%json {...}`, special tokens `<|...|>`).

    Special tokens can only be checked against a tokenizer: pass the model's bridge when the
    grammar names any, so a missing one is an InvalidRequest now and not a failure at insert."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(_where(param) + "must be a non-empty grammar", param=param)
    from llguidance import LLMatcher

    g = LLMatcher.grammar_from_lark(text)
    _validate(g, param, "is not a usable grammar", tokenizer)
    return Grammar(g, "lark")


def regex(
    pattern: str, *, param: Optional[str] = None, tokenizer: Optional[TokenizerBridge] = None
) -> Grammar:
    """A grammar for text matching `pattern` whole (Rust regex syntax, no look-around)."""
    if not isinstance(pattern, str):
        raise InvalidRequest(_where(param) + "must be a string", param=param)
    from llguidance import LLMatcher

    g = LLMatcher.grammar_from_regex(pattern)
    _validate(g, param, "is not a usable regular expression", tokenizer)
    return Grammar(g, "regex")


def json_fragment(schema: Any, *, strict: bool, param: Optional[str] = None) -> str:
    """`%json {...}` for a Lark grammar (a tool call's arguments), with the same compact JSON and
    strict handling as `json_schema`; raises InvalidRequest naming `param` as it does."""
    json_schema(schema, strict=strict, param=param)  # the same checks, on its own
    doc = _schema_doc(schema, param)
    if strict:
        close_objects(doc)
    doc["x-guidance"] = dict(JSON_OPTIONS)
    return "%json " + json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _schema_doc(schema: Any, param: Optional[str]) -> dict[str, Any]:
    """A private copy of the schema (plain JSON, so no caller's object is changed), without
    any `x-guidance` of its own (that would switch compiler options)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(_where(param) + "must be a JSON Schema object", param=param)
    try:
        doc: dict[str, Any] = json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise _invalid(param, "is not plain JSON", str(exc)) from None
    doc.pop("x-guidance", None)
    return doc


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_OPEN_KEYS = (
    "additionalProperties",
    "patternProperties",
    "unevaluatedProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "$ref",
)


def close_objects(s: Any, here: bool = True) -> None:
    """Set `additionalProperties: false` on every schema that lists `properties` and leaves
    others open. Not on allOf members (each would forbid the others' properties) nor where
    composition or a $ref could bring properties in; their nested schemas are closed."""
    if not isinstance(s, dict):
        return
    if here and isinstance(s.get("properties"), dict) and not any(k in s for k in _OPEN_KEYS):
        s["additionalProperties"] = False
    for k in _SCHEMA_MAPS:
        sub = s.get(k)
        if isinstance(sub, dict):
            for v in sub.values():
                close_objects(v)
    for k in _SCHEMA_ONE:
        close_objects(s.get(k))
    for k in _SCHEMA_LISTS:
        sub = s.get(k)
        if isinstance(sub, list):
            for v in sub:
                close_objects(v)
    members = s.get("allOf")
    if isinstance(members, list):
        for v in members:
            close_objects(v, here=False)


def _validate(
    grammar: str, param: Optional[str], what: str, tokenizer: Optional[TokenizerBridge]
) -> None:
    """The compiler's own check (the same code that builds matchers), with the model's
    tokenizer when one is given."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(
        grammar, tokenizer.ll if tokenizer is not None else None
    )
    if is_error:
        raise _invalid(param, what, messages[0] if messages else "rejected by the compiler")


def _where(param: Optional[str]) -> str:
    return f"{param} " if param else "the grammar "


def _invalid(param: Optional[str], what: str, detail: str) -> InvalidRequest:
    detail = " ".join(detail.split())
    if len(detail) > MAX_MESSAGE:
        detail = detail[: MAX_MESSAGE - 3] + "..."
    return InvalidRequest(f"{_where(param)}{what}: {detail}", param=param)


# -- the tokenizer bridge: one per loaded model


_bridges: weakref.WeakKeyDictionary[Any, dict[int, TokenizerBridge]] = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


class TokenizerBridge:
    """llguidance's view of one model's tokenizer (its tokens as bytes, a token trie), built
    once per loaded model and cached; also keeps compiled matchers for repeated grammars."""

    def __init__(self, ll: Any, *, vocab_size: int, eos_token: int, build_s: float) -> None:
        self.ll = ll
        self.vocab_size = vocab_size  # the logits' width the masks are made for
        self.eos_token = eos_token  # what a finished grammar forces
        self.build_s = build_s
        self._matchers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, *, vocab_size: Optional[int] = None) -> TokenizerBridge:
        """The bridge of `tokenizer` (mlx-lm's TokenizerWrapper, or a fast Hugging Face
        tokenizer), built on first use and cached while the tokenizer lives. `vocab_size`: the
        model's logits width when it is not the tokenizer's (padded embeddings)."""
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        n = int(vocab_size or len(hf))
        try:
            with _bridges_lock:
                found = _bridges.get(tokenizer, {}).get(n)
        except TypeError:  # not weakly referenceable: built every time
            return cls._build(tokenizer, hf, n)
        if found is not None:
            return found
        bridge = cls._build(tokenizer, hf, n)
        with _bridges_lock:
            return _bridges.setdefault(tokenizer, {}).setdefault(n, bridge)

    @classmethod
    def _build(cls, tokenizer: Any, hf: Any, n: int) -> TokenizerBridge:
        import llguidance.hf

        eos_ids = getattr(tokenizer, "eos_token_ids", None) or []
        primary = getattr(tokenizer, "eos_token_id", None)
        if primary is None:
            primary = getattr(hf, "eos_token_id", None)
        if primary is None and eos_ids:
            primary = min(eos_ids)
        if primary is None:
            raise ValueError("the tokenizer has no end-of-sequence token to end constrained output")
        # every end token the batch stops on counts as the end of the grammar's text
        eos = [int(primary)] + sorted(int(t) for t in eos_ids if int(t) != int(primary))
        t0 = time.perf_counter()
        # Raises ValueError for a tokenizer that is not a fast (Rust) one.
        ll = llguidance.hf.from_tokenizer(hf, n_vocab=max(n, len(hf)), eos_token=eos)
        return cls(ll, vocab_size=n, eos_token=int(primary), build_s=time.perf_counter() - t0)

    def matcher(self, grammar: Grammar) -> Any:
        """A fresh llguidance matcher for `grammar` (a copy of a cached compiled one)."""
        from llguidance import LLMatcher

        with self._lock:
            base = self._matchers.get(grammar.text)
            if base is not None:
                self._matchers.move_to_end(grammar.text)
        if base is None:
            base = LLMatcher(self.ll, grammar.text, log_level=0)
            if base.is_error():
                return base  # not cached: the caller reports it
            with self._lock:
                self._matchers[grammar.text] = base
                while len(self._matchers) > MATCHER_CACHE:
                    self._matchers.popitem(last=False)
        return base.deep_copy()


# -- the per-sequence logits processor


def make_processor(
    constraint: Constraint, tokenizer: Any, *, vocab_size: Optional[int] = None
) -> GrammarProcessor:
    """The logits processor of one constrained sequence, for BatchGenerator.insert(...,
    logits_processors=[[..., proc]]) (last, so nothing after it lifts the mask). Raises
    InvalidRequest naming the constraint's field if the grammar can't run on this model."""
    try:
        bridge = TokenizerBridge.for_tokenizer(tokenizer, vocab_size=vocab_size)
    except ValueError as exc:  # a slow tokenizer, no end token: the model can't do it
        raise _invalid(constraint.param, "can't be used with this model", str(exc)) from None
    return GrammarProcessor(constraint, bridge)


class GrammarProcessor:
    """mlx-lm logits processor `(tokens, logits) -> logits` that lets only the grammar's tokens
    through, for one sequence; `error` holds why the matcher stopped, if it failed.

    `tokens` is the row's context: prompt, then every token fed so far, the last being the one
    this step feeds (at the first call, the prompt's last token; after that, the token sampled
    at the step before, which is what the matcher consumes).

    With `overlap` the step's forward pass is started before the mask is computed, so the two
    run at the same time. Off by default: it starts the forward as a graph of its own, and the
    next row's token (queued behind it) then waits for the whole forward; the next step's graph
    is then built while nothing runs. Measured slower (benchmarks/constraints_cost.py)."""

    def __init__(
        self, constraint: Constraint, bridge: TokenizerBridge, *, overlap: bool = False
    ) -> None:
        import mlx.core as mx

        self.constraint = constraint
        self.bridge = bridge
        self.overlap = overlap
        self._matcher = bridge.matcher(constraint.grammar)
        if self._matcher.is_error():
            raise _invalid(
                constraint.param, "can't be used with this model", self._matcher.get_error()
            )
        import numpy as np

        self._np = np
        self._mx = mx
        self._bits = np.zeros((1, (bridge.ll.vocab_size + 31) // 32), dtype=np.int32)
        # the Metal kernel where it runs, else a boolean mask from unpacked bits
        self._metal = bool(mx.metal.is_available()) and mx.default_device() == mx.gpu
        self._started = False
        self._eos_only: Any = None
        self.error: Optional[str] = None
        self.steps = 0  # masks computed
        self.mask_s = 0.0  # time spent consuming tokens, computing and building masks

    # -- what the worker reads when the sequence ends
    @property
    def finished(self) -> bool:
        """The grammar is complete (the row is being ended with its end-of-sequence token)."""
        return self.error is None and bool(self._matcher.is_stopped())

    def exception(self) -> Optional[InvalidRequest]:
        """The error to give the request instead of its output, if the matcher failed."""
        if self.error is None:
            return None
        return _invalid(self.constraint.param, "stopped constrained generation", self.error)

    def __call__(self, tokens: Any, logits: Any) -> Any:
        mx = self._mx
        if self._started:
            last = tokens[-1]
            if self.overlap:
                # Queued before the forward pass, so reading it does not wait for the forward.
                mx.async_eval(last)
                mx.async_eval(logits)
            token = int(last.item())
            t0 = time.perf_counter()
            self._consume(token)
        else:
            self._started = True
            if self.overlap:
                mx.async_eval(logits)
            t0 = time.perf_counter()
        out = self._apply(logits)
        self.mask_s += time.perf_counter() - t0
        self.steps += 1
        return out

    def _consume(self, token: int) -> None:
        m = self._matcher
        if self.error is not None or m.is_stopped():
            return  # the end token that closed it, being fed now; the row ends this step
        if not m.consume_token(token):
            self.error = m.get_error() or f"token {token} is not allowed by the grammar"

    def _apply(self, logits: Any) -> Any:
        mx, np = self._mx, self._np
        m = self._matcher
        width = logits.shape[-1]
        if self.error is None and not m.is_stopped():
            m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            if m.is_error():
                self.error = m.get_error()
            elif self._metal and width <= self._bits.shape[1] * 32:
                from llguidance.mlx import apply_token_bitmask

                return apply_token_bitmask(logits.reshape(1, width), self._bits).reshape(
                    logits.shape
                )
            else:
                allowed = np.unpackbits(
                    self._bits.view(np.uint8),
                    count=min(width, self._bits.size * 32),
                    bitorder="little",
                ).view(np.bool_)
                if allowed.size < width:  # logits wider than the tokenizer: the rest never
                    allowed = np.concatenate([allowed, np.zeros(width - allowed.size, np.bool_)])
                return mx.where(mx.array(allowed).reshape(logits.shape), logits, -mx.inf)
        # Finished or failed: only the end-of-sequence token, so the row stops ("stop").
        if self._eos_only is None or self._eos_only.size != width:
            only = np.zeros(width, np.bool_)
            only[self.bridge.eos_token] = True
            self._eos_only = mx.array(only)
        return mx.where(self._eos_only.reshape(logits.shape), logits, -mx.inf)
