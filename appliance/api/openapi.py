"""GET /openapi.json: an OpenAPI 3.1 document of the routes the server really has.

The request schemas mirror `parsing.py` (ranges, nullable fields, what is refused), the response
schemas mirror the resources, and each operation lists the error statuses its middleware and
resource can answer with, each an OpenAI error object. tests/test_openapi.py compares the paths
with the app's routes and runs schemathesis against a live server, so a route added without a
spec entry, or an answer outside its schema, fails a test.
"""

from __future__ import annotations

import copy
from typing import Any

import falcon
import falcon.asgi
import orjson

from .. import __version__
from ..config import AppConfig
from . import openapi_agents as agents
from .parsing import MAX_STOP_LEN, MAX_STOPS, ROLES

Schema = dict[str, Any]

REF = "#/components/schemas/"


def _ref(name: str) -> Schema:
    return {"$ref": REF + name}


def _opt(schema: Schema) -> Schema:
    """An optional request field: the parsers treat null as absent."""
    s = copy.deepcopy(schema)
    t = s.get("type")
    if isinstance(t, str):
        s["type"] = [t, "null"]
    elif isinstance(t, list):
        s["type"] = [*t, "null"]
    elif "anyOf" in s:
        s["anyOf"] = [*s["anyOf"], {"type": "null"}]
    else:
        s = {"anyOf": [s, {"type": "null"}]}
    return s


def _int(lo: int, hi: int, doc: str = "") -> Schema:
    s: Schema = {"type": "integer", "minimum": lo, "maximum": hi}
    if doc:
        s["description"] = doc
    return s


def _num(lo: float, hi: float, doc: str = "", *, lo_open: bool = False) -> Schema:
    s: Schema = {"type": "number", "maximum": hi}
    s["exclusiveMinimum" if lo_open else "minimum"] = lo
    if doc:
        s["description"] = doc
    return s


NULLABLE_STR = {"type": ["string", "null"]}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}

# -- request schemas (parsing.py)

_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_CONTENT: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": _ref("TextPart"), "description": "Text parts only."},
    ]
}

_COMMON: dict[str, Schema] = {
    "model": _opt(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 256,
            "description": "A catalog model; absent: models.default.",
        }
    ),
    "stream": _opt({"type": "boolean"}),
    "stream_options": _opt(
        {
            "type": "object",
            "properties": {"include_usage": _opt({"type": "boolean"})},
        }
    ),
    "max_tokens": _opt(_int(1, 1 << 20, "Capped by the model's max_tokens and context.")),
    "max_completion_tokens": _opt(_int(1, 1 << 20, "Takes precedence over max_tokens.")),
    "n": _opt(_int(1, 1, "Only 1: send several requests instead.")),
    "best_of": _opt(_int(1, 1)),
    "temperature": _opt(_num(0, 2, "Default 0 (greedy), as mlx_lm.server.")),
    "top_p": _opt(_num(0, 1, lo_open=True)),
    "top_k": _opt(_int(-1, 1 << 20, "0 or -1: off.")),
    "min_p": _opt(_num(0, 1)),
    "seed": _opt(_int(-(1 << 63), (1 << 64) - 1)),
    "repetition_penalty": _opt(_num(0.01, 10)),
    "presence_penalty": _opt(_num(-2, 2)),
    "frequency_penalty": _opt(_num(-2, 2)),
    "logit_bias": _opt(
        {
            "type": "object",
            "maxProperties": 1024,
            "propertyNames": {"pattern": "^-?[0-9]+$"},
            "additionalProperties": _num(-100, 100),
            "description": "Token id -> bias; ids outside the vocabulary are refused (400).",
        }
    ),
    "stop": _opt(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
                {
                    "type": "array",
                    "maxItems": MAX_STOPS,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
                },
            ]
        }
    ),
    "priority": {
        "enum": ["normal", "high", None],
        "description": "high needs the admin key (403 otherwise).",
    },
    "user": _opt({"type": "string", "maxLength": 256}),
}

_MESSAGE: Schema = {
    "oneOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": [r for r in ROLES if r != "assistant"]},
                "content": _CONTENT,
            },
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"const": "assistant"}, "content": _opt(_CONTENT)},
        },
    ]
}

CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4096,
            "items": _ref("ChatMessage"),
        },
        **_COMMON,
        "logprobs": _opt({"type": "boolean"}),
        "top_logprobs": _opt(_int(0, 20, "Needs logprobs: true.")),
    },
}

_TOKENS: Schema = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
COMPLETION_REQUEST: Schema = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "description": "One prompt: text or token ids (a list holding one of them is "
            "accepted).",
            "anyOf": [
                {"type": "string", "minLength": 1},
                _TOKENS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {"type": "string", "minLength": 1},
                },
                {"type": "array", "minItems": 1, "maxItems": 1, "items": _TOKENS},
            ],
        },
        **_COMMON,
        "echo": _opt({"type": "boolean"}),
        "logprobs": _opt(_int(0, 20, "Top log-probabilities per token.")),
        "suffix": {"type": "null", "description": "Not supported."},
    },
}

_EMBED_TOKENS: Schema = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
EMBEDDINGS_REQUEST: Schema = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": _COMMON["model"],
        "input": {
            "description": "A string, token ids, or a list of strings and token-id lists.",
            "anyOf": [
                {"type": "string"},
                _EMBED_TOKENS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2048,
                    "items": {"anyOf": [{"type": "string"}, _EMBED_TOKENS]},
                },
            ],
        },
        "encoding_format": {"enum": ["float", "base64", None]},
        "dimensions": _opt(
            {
                "type": "integer",
                "minimum": 1,
                "description": "Truncate (and renormalise) to this many.",
            }
        ),
    },
}

_DOC_TEXT: Schema = {"type": "string", "minLength": 1}
RERANK_REQUEST: Schema = {
    "type": "object",
    "required": ["query", "documents"],
    "properties": {
        "model": _COMMON["model"],
        "query": {"type": "string", "minLength": 1},
        "documents": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1000,
            "items": {
                "anyOf": [
                    _DOC_TEXT,
                    {"type": "object", "required": ["text"], "properties": {"text": _DOC_TEXT}},
                ]
            },
        },
        "top_n": _opt({"type": "integer", "minimum": 1}),
        "return_documents": {"type": "boolean", "description": "Default true."},
    },
}

_MODEL_NAME: Schema = {"type": "string", "pattern": r"\S", "description": "A catalog model."}


def _setting_schemas() -> dict[str, Schema]:
    """The model settings (config.schema.ModelSpec), as JSON Schema: one declaration."""
    import dataclasses
    import typing

    from ..config.schema import ModelSpec

    kinds = {str: "string", int: "integer", float: "number", bool: "boolean"}
    out: dict[str, Schema] = {}
    hints = typing.get_type_hints(ModelSpec)
    for f in dataclasses.fields(ModelSpec):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args else tp
        kind = kinds.get(base, "string")
        s: Schema = {"type": [kind, "null"] if args else kind}
        if kind == "number":
            s["type"] = ["number", "integer", "null"] if args else ["number", "integer"]
        s["description"] = f.metadata.get("help", "")
        out[f.name] = s
    return out


ADMIN_LOAD_REQUEST: Schema = {
    "type": "object",
    "description": "A catalog model by name, or any model by path with a preset and settings "
    "(the keys of a catalog entry).",
    "anyOf": [{"required": ["model"]}, {"required": ["path"]}],
    "additionalProperties": False,
    "properties": {
        "model": _MODEL_NAME,
        "alias": {"type": ["string", "null"], "description": "The name to serve it under."},
        **_setting_schemas(),
    },
}
ADMIN_UNLOAD_REQUEST: Schema = {
    "type": "object",
    "required": ["model"],
    "additionalProperties": False,
    "properties": {
        "model": _MODEL_NAME,
        "timeout_s": {
            "type": "number",
            "minimum": 0,
            "maximum": 3600,
            "description": "Wait this long for in-flight requests (default 30).",
        },
    },
}

# -- response schemas (openai.py, probes.py, admin.py)

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": NULLABLE_STR,
                "code": NULLABLE_STR,
            },
        }
    },
}

USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "minimum": 0}},
        },
    },
}

_TOP: Schema = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {
        "token": {"type": "string"},
        "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer"}},
    },
}
CHAT_LOGPROBS: Schema = {
    "type": ["object", "null"],
    "required": ["content"],
    "properties": {
        "content": {
            "type": "array",
            "items": {
                **_TOP,
                "properties": {
                    **_TOP["properties"],
                    "top_logprobs": {"type": "array", "items": _TOP},
                },
            },
        }
    },
}
FINISH = {"enum": ["stop", "length"]}


def _envelope(
    obj: str, choice: Schema, choice_required: list[str], usage: Schema, *, chunk: bool
) -> Schema:
    """The OpenAI response around its choices: a whole answer (usage required, at least one
    choice) or a stream chunk (at most one choice, usage only on the last)."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"]),
        "properties": {
            "id": {"type": "string"},
            "object": {"const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "maxItems" if chunk else "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["index", *choice_required],
                    "properties": {"index": {"type": "integer"}, **choice},
                },
            },
            "usage": usage,
        },
    }


CHAT_COMPLETION: Schema = _envelope(
    "chat.completion",
    {
        "message": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
        },
        "logprobs": CHAT_LOGPROBS,
        "finish_reason": FINISH,
    },
    ["message", "finish_reason"],
    _ref("Usage"),
    chunk=False,
)
COMPLETION_LOGPROBS: Schema = {
    "type": ["object", "null"],
    "properties": {
        "tokens": {"type": "array", "items": {"type": "string"}},
        "token_logprobs": {"type": "array", "items": {"type": "number"}},
        "top_logprobs": {
            "type": "array",
            "items": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}
COMPLETION: Schema = _envelope(
    "text_completion",
    {"text": {"type": "string"}, "logprobs": COMPLETION_LOGPROBS, "finish_reason": FINISH},
    ["text", "finish_reason"],
    _ref("Usage"),
    chunk=False,
)
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "loaded": {"type": "boolean"},
                    "aliases": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "models.aliases names and patterns that lead here.",
                    },
                    "alias_of": {
                        "type": "string",
                        "description": "An exact alias: the catalog model it names.",
                    },
                },
            },
        },
    },
}
_TOKEN_USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}
EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {
                        "anyOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "description": "base64 of little-endian float32"},
                        ]
                    },
                },
            },
        },
        "usage": _TOKEN_USAGE,
    },
}
RERANK: Schema = {
    "type": "object",
    "required": ["object", "model", "results", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "relevance_score"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "relevance_score": {"type": "number"},
                    "document": {
                        "type": "object",
                        "required": ["text"],
                        "properties": {"text": {"type": "string"}},
                    },
                },
            },
        },
        "usage": _TOKEN_USAGE,
    },
}
CHAT_CHUNK: Schema = _envelope(
    "chat.completion.chunk",
    {
        "delta": {
            "type": "object",
            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
        },
        "logprobs": CHAT_LOGPROBS,
        "finish_reason": {"enum": ["stop", "length", None]},
    },
    ["delta", "finish_reason"],
    USAGE,
    chunk=True,
)
COMPLETION_CHUNK: Schema = _envelope(
    "text_completion",
    {
        "text": {"type": "string"},
        "logprobs": COMPLETION_LOGPROBS,
        "finish_reason": {"enum": ["stop", "length", None]},
    },
    ["text", "finish_reason"],
    USAGE,
    chunk=True,
)


def sse_event(chunk: Schema) -> Schema:
    """One server-sent event of a stream: a chunk, an error object (a failure after the
    stream began), or the final `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [chunk, ERROR]},
                    },
                ]
            },
        },
    }


HEALTH: Schema = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"const": "ok"}},
}
READY: Schema = {
    "type": "object",
    "required": ["status", "models"],
    "properties": {
        "status": {"const": "ready"},
        "models": {"type": "array", "items": {"type": "string"}},
    },
}
_NULLABLE_BYTES = {"type": ["integer", "null"], "minimum": 0}
ADMIN_MODEL: Schema = {
    "type": "object",
    "required": [
        "name",
        "path",
        "state",
        "loaded",
        "default",
        "auto_load",
        "context_length",
        "max_tokens",
        "ttl_s",
        "requests_served",
        "in_flight",
    ],
    "properties": {
        "name": {"type": "string"},
        "path": {"type": "string"},
        "state": {"enum": ["unloaded", "loading", "loaded", "failed", "unloading"]},
        "loaded": {"type": "boolean"},
        "default": {"type": "boolean"},
        "auto_load": {"type": "boolean"},
        "source": {"enum": ["catalog", "admin"]},
        "settings": {"type": "object"},
        "context_length": {"type": "integer"},
        "max_tokens": {"type": "integer"},
        "ttl_s": {"type": "number"},
        "memory_estimate_bytes": _NULLABLE_BYTES,
        "loaded_at": NULLABLE_NUM,
        "last_load_seconds": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "Seconds the last successful load took.",
        },
        "last_used": NULLABLE_NUM,
        "requests_served": {"type": "integer", "minimum": 0},
        "in_flight": {"type": "integer", "minimum": 0},
        "error": NULLABLE_STR,
        "extra": {"type": "object"},
    },
}
ADMIN_MODELS: Schema = {
    "type": "object",
    "required": ["object", "data", "loaded", "default"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": _ref("AdminModel")},
        "loaded": {"type": "array", "items": {"type": "string"}},
        "default": {"type": "string"},
    },
}
ADMIN_LOADED: Schema = {
    "type": "object",
    "required": ["model", "already_loaded", "seconds"],
    "properties": {
        "model": _ref("AdminModel"),
        "already_loaded": {"type": "boolean"},
        "seconds": {"type": "number", "minimum": 0},
    },
}
ADMIN_UNLOADED: Schema = {
    "type": "object",
    "required": ["model", "was_loaded", "in_flight_at_start", "seconds"],
    "properties": {
        "model": _ref("AdminModel"),
        "was_loaded": {"type": "boolean"},
        "in_flight_at_start": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
    },
}
_STATUS_MODEL: Schema = {
    "type": "object",
    "required": ["name", "state", "path", "settings", "running", "waiting", "requests_served"],
    "properties": {
        "name": {"type": "string"},
        "state": {"enum": ["unloaded", "loading", "loaded", "failed", "unloading"]},
        "path": {"type": "string"},
        "settings": {"type": "object"},
        "memory_estimate_bytes": _NULLABLE_BYTES,
        "running": {"type": "integer", "minimum": 0},
        "waiting": {"type": "integer", "minimum": 0},
        "requests_served": {"type": "integer", "minimum": 0},
        "tokens_generated": {"type": "integer", "minimum": 0},
        "tokens_per_s": {"type": "number", "minimum": 0},
        "ttft_p50_s": NULLABLE_NUM,
    },
}
STATUS: Schema = {
    "type": "object",
    "description": "One snapshot of the status page (see docs/operations.md, Status page).",
    "required": [
        "generated_at",
        "version",
        "uptime_s",
        "health",
        "readiness",
        "safe_mode",
        "access",
        "requests",
        "models",
        "memory",
        "prompt_cache",
        "errors",
        "history",
    ],
    "properties": {
        "generated_at": {"type": "number"},
        "version": {"type": "string"},
        "uptime_s": {"type": "number", "minimum": 0},
        "health": {
            "type": "object",
            "required": ["status", "reasons"],
            "properties": {"status": {"enum": ["ok", "degraded", "failing"]}},
        },
        "readiness": {
            "type": "object",
            "required": ["ready", "reason"],
            "properties": {"ready": {"type": "boolean"}, "reason": NULLABLE_STR},
        },
        "safe_mode": {
            "type": "object",
            "required": ["on", "reason"],
            "properties": {"on": {"type": "boolean"}, "reason": NULLABLE_STR},
        },
        "access": {
            "type": "object",
            "required": ["mode", "admin_actions", "note", "refresh_s"],
            "properties": {
                "mode": {"enum": ["key", "open"]},
                "admin_actions": {"type": "boolean"},
                "note": {"type": "string"},
                "refresh_s": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "requests": {"type": "object"},
        "models": {"type": "array", "items": _STATUS_MODEL},
        "memory": {"type": "object"},
        "prompt_cache": {"type": "object"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["status", "path", "count"],
                "properties": {
                    "status": {"type": "integer"},
                    "path": {"type": "string"},
                    "count": {"type": "integer", "minimum": 1},
                },
            },
        },
        "history": {
            "type": "object",
            "required": ["interval_s", "window_s", "samples"],
            "properties": {"samples": {"type": "array", "items": {"type": "object"}}},
        },
    },
}
ADMIN_HEALTH: Schema = {
    "type": "object",
    "required": [
        "status",
        "reasons",
        "system_memory_percent",
        "memory_bytes",
        "models_loaded",
        "requests",
        "generation_threads_alive",
        "helpers",
        "uptime_s",
        "version",
        "safe_mode",
        "draining",
    ],
    "properties": {
        "status": {"enum": ["ok", "degraded", "failing"]},
        "reasons": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["status", "reason"],
                "properties": {
                    "status": {"enum": ["ok", "degraded", "failing"]},
                    "reason": {"type": "string"},
                },
            },
        },
        "system_memory_percent": {"type": "number", "minimum": 0, "maximum": 100},
        "memory_bytes": {
            "type": "object",
            "required": ["rss", "mlx_active", "mlx_peak", "mlx_cache"],
            "properties": {
                k: _NULLABLE_BYTES for k in ("rss", "mlx_active", "mlx_peak", "mlx_cache")
            },
        },
        "models_loaded": {"type": "array", "items": {"type": "string"}},
        "requests": {
            "type": "object",
            "required": ["running", "waiting", "max_running", "max_queued"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("running", "waiting", "max_running", "max_queued")
            },
        },
        "generation_threads_alive": {"type": "integer", "minimum": 0},
        "helpers": {"type": "object"},
        "uptime_s": {"type": "number", "minimum": 0},
        "version": {"type": "string"},
        "backend": NULLABLE_STR,
        "cpu_blas": {
            "type": "object",
            "description": "The BLAS MLX's CPU backend multiplies with (engine.cpu_blas): the "
            "optimized library preloaded (null: the mlx wheel's own), the gemv-forwarding "
            "library in front of it, and why.",
            "required": ["setting", "library", "gemv_forward", "reason"],
            "properties": {
                "setting": {"type": "string"},
                "library": NULLABLE_STR,
                "gemv_forward": NULLABLE_STR,
                "reason": {"type": "string"},
                "on_cpu": {"type": "boolean"},
            },
        },
        "safe_mode": {"type": "boolean"},
        "safe_mode_reason": NULLABLE_STR,
        "safe_mode_exit": {
            "type": "object",
            "properties": {
                "how": {"type": "string"},
                "automatic_in_s": {"type": ["number", "null"], "minimum": 0},
                "ended": {"type": ["object", "null"]},
            },
        },
        "limits_in_force": {
            "type": "object",
            "properties": {
                "profile": {"enum": ["normal", "safe-mode"]},
                "max_running": {"type": "integer", "minimum": 1},
                "max_queued": {"type": "integer", "minimum": 0},
                "queue_timeout_s": {"type": "number"},
                "memory_percent": {"type": "number"},
                "mlx_active_bytes": _NULLABLE_BYTES,
                "retry_after_s": {"type": "integer"},
            },
        },
        "memory_usage_percent": {
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "description": "system_memory_percent, by the hardening plan's name.",
        },
        "metal": {
            "type": "object",
            "description": "MLX memory in GB (10^9 bytes) on every backend, by the hardening "
            "plan's name; null where there is no MLX.",
            "properties": {
                k: {"type": ["number", "null"], "minimum": 0}
                for k in ("active_memory_gb", "peak_memory_gb", "cache_memory_gb")
            },
        },
        "in_flight_requests": {
            "type": "integer",
            "minimum": 0,
            "description": "Requests running or waiting for a slot.",
        },
        "draining": {"type": "boolean"},
    },
}
ADMIN_SAFE_MODE_EXIT_REQUEST: Schema = {
    "type": "object",
    "description": "No fields: an empty object, or no body at all.",
    "additionalProperties": False,
    "maxProperties": 0,
}
ADMIN_SAFE_MODE_EXITED: Schema = {
    "type": "object",
    "required": ["safe_mode", "was_on", "reason", "limits", "auto_load"],
    "properties": {
        "safe_mode": {"const": False},
        "was_on": {"type": "boolean"},
        "reason": NULLABLE_STR,
        "limits": {"type": "object"},
        "auto_load": {"type": "array", "items": {"type": "string"}},
    },
}
ADMIN_CONFIG: Schema = {
    "type": "object",
    "description": "The composed config, every key and secret redacted (see "
    "docs/configuration.md).",
    "required": ["server", "models", "limits", "security"],
    "properties": {
        "security": {
            "type": "object",
            "properties": {
                "admin_keys": {"type": "array", "items": {"const": "<redacted>"}},
                "api_keys": {"type": "array", "items": {"const": "<redacted>"}},
            },
        }
    },
}

# -- statuses

_ERROR_TEXT = {
    "400": "Invalid request: the error's param names the field.",
    "401": "Missing or wrong key (code invalid_api_key).",
    "403": "Forbidden: a Host not allowed on a loopback-bound server (forbidden_host), the admin "
    "API closed (admin_disabled), the status page asked from another machine while no admin "
    "key is set (admin_disabled), or priority high without the admin key.",
    "404": "Unknown model (model_not_found).",
    "413": "The body is over limits.max_body_bytes (request_too_large).",
    "429": "Rate limited (rate_limited) or every slot and queue place taken (server_busy).",
    "500": "Engine failure.",
    "503": "Shedding load (overloaded), draining (draining), not ready (not_ready), not enough "
    "memory (insufficient_memory), a helper down (helper_unavailable), or safe mode on and the "
    "model not loaded (safe_mode, with X-Safe-Mode: on).",
    "504": "The request ran past limits.request_timeout_s (request_timeout).",
}
_RETRY = ("429", "503", "529")
# Anthropic's routes: Anthropic's error object; a full server and every 503 are 529.
_ANTHROPIC_TEXT = {
    **{k: v for k, v in _ERROR_TEXT.items() if k != "503"},
    "404": "Unknown model (not_found_error), or no such route.",
    "429": "Rate limited (rate_limit_error).",
    "529": "Overloaded (overloaded_error): every slot and queue place taken, shedding load, "
    "draining, not ready, not enough memory, or safe mode on and the model not loaded.",
}


def _error_response(status: str) -> Schema:
    r: Schema = {
        "description": _ERROR_TEXT[status],
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if status in _RETRY:
        r["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return r


def _anthropic_error_response(status: str) -> Schema:
    r: Schema = {
        "description": _ANTHROPIC_TEXT[status],
        "content": {"application/json": {"schema": _ref("AnthropicError")}},
    }
    if status in _RETRY:
        r["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return r


def _ok(schema: Schema, description: str, media: str = "application/json") -> Schema:
    return {"description": description, "content": {media: {"schema": schema}}}


def _op(
    op_id: str,
    summary: str,
    tag: str,
    ok: Schema,
    errors: tuple[str, ...],
    security: list[dict[str, list[str]]],
    body: Schema | None = None,
    errors_prefix: str = "E",
) -> Schema:
    op: Schema = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "security": security,
        "responses": {
            "200": ok,
            **{s: {"$ref": f"#/components/responses/{errors_prefix}{s}"} for s in errors},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _body_optional(op: Schema) -> Schema:
    op["requestBody"]["required"] = False
    return op


def spec(cfg: AppConfig) -> dict[str, Any]:
    """The OpenAPI document for an appliance built from `cfg`."""
    sec = cfg.security
    keyed: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    # /v1 needs a key only when security.api_keys is set: an empty requirement means "or none".
    v1 = [*keyed, {}]
    probes = [] if sec.open_probes else v1
    metrics = [] if sec.open_metrics and not sec.metrics_allow else v1
    guard = ("401", "403")  # a missing key where one is needed; a Host not allowed
    gen_errors = ("400", *guard, "404", "413", "429", "500", "503", "504")
    admin_post = ("400", *guard, "404", "413", "429", "500", "503")
    status_errors = (*guard, "429")  # the admin rate limit counts the page and its data

    def generation(op_id: str, summary: str, req: str, resp: str, chunk: Schema) -> Schema:
        op = _op(
            op_id,
            summary,
            "inference",
            _ok(
                _ref(resp),
                "The result; with stream: true, server-sent events, one chunk "
                "per event, ending with `data: [DONE]`.",
            ),
            gen_errors,
            v1,
            _ref(req),
        )
        op["responses"]["200"]["content"]["text/event-stream"] = {"schema": sse_event(chunk)}
        return op

    anthropic_errors = ("400", *guard, "404", "413", "429", "500", "504", "529")

    def anthropic(op_id: str, summary: str, req: str, resp: str, stream: bool) -> Schema:
        op = _op(
            op_id,
            summary,
            "anthropic",
            _ok(_ref(resp), "The result."),
            anthropic_errors,
            v1,
            _ref(req),
            errors_prefix="A",
        )
        if stream:
            op["responses"]["200"]["description"] = (
                "The message; with stream: true, Anthropic's server-sent events (event: names "
                "the type), ending with message_stop, or an error event."
            )
            op["responses"]["200"]["content"]["text/event-stream"] = {
                "schema": agents.ANTHROPIC_EVENT
            }
        return op

    response_id = [
        {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    responses_post = _op(
        "createResponse",
        "OpenAI Responses: a response to the input (and the stored conversation of "
        "previous_response_id).",
        "responses",
        _ok(
            _ref("Response"),
            "The response; with stream: true, its numbered server-sent events, ending with "
            "response.completed, response.incomplete or response.failed.",
        ),
        gen_errors,
        v1,
        _ref("ResponseRequest"),
    )
    responses_post["responses"]["200"]["content"]["text/event-stream"] = {
        "schema": agents.RESPONSE_EVENT
    }

    paths: dict[str, Any] = {
        "/v1/messages": {
            "post": anthropic(
                "createMessage",
                "Anthropic Messages.",
                "AnthropicMessagesRequest",
                "AnthropicMessage",
                True,
            )
        },
        "/v1/messages/count_tokens": {
            "post": anthropic(
                "countMessageTokens",
                "Anthropic Messages: the prompt's tokens, nothing generated.",
                "AnthropicCountTokensRequest",
                "AnthropicCountTokens",
                False,
            )
        },
        "/v1/responses": {"post": responses_post},
        "/v1/responses/{response_id}": {
            "parameters": response_id,
            "get": _op(
                "getResponse",
                "A stored response (store: true).",
                "responses",
                _ok(_ref("Response"), "The stored response."),
                (*guard, "404"),
                v1,
            ),
            "delete": _op(
                "deleteResponse",
                "Forget a stored response.",
                "responses",
                _ok(_ref("ResponseDeleted"), "Deleted."),
                (*guard, "404"),
                v1,
            ),
        },
        "/healthz": {
            "get": _op(
                "healthz",
                "Liveness: 200 while the process serves.",
                "probes",
                _ok(_ref("Health"), "Alive."),
                guard,
                probes,
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "Readiness: a model is loaded and work is accepted.",
                "probes",
                _ok(_ref("Ready"), "Ready."),
                (*guard, "503"),
                probes,
            )
        },
        cfg.metrics.path: {
            "get": _op(
                "metrics",
                "Prometheus metrics.",
                "probes",
                _ok({"type": "string"}, "Prometheus text format 0.0.4.", "text/plain"),
                guard,
                metrics,
            )
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "This document.",
                "meta",
                _ok({"type": "object"}, "OpenAPI 3.1."),
                guard,
                v1,
            )
        },
        "/v1/models": {
            "get": _op(
                "listModels",
                "Every catalog model.",
                "inference",
                _ok(_ref("ModelList"), "The catalog."),
                guard,
                v1,
            )
        },
        "/v1/chat/completions": {
            "post": generation(
                "createChatCompletion",
                "Chat completion.",
                "ChatCompletionRequest",
                "ChatCompletion",
                CHAT_CHUNK,
            )
        },
        "/v1/completions": {
            "post": generation(
                "createCompletion",
                "Text completion.",
                "CompletionRequest",
                "Completion",
                COMPLETION_CHUNK,
            )
        },
        "/v1/embeddings": {
            "post": _op(
                "createEmbedding",
                "Embeddings from a local model or the embedding helper.",
                "inference",
                _ok(_ref("Embeddings"), "One embedding per input."),
                gen_errors,
                v1,
                _ref("EmbeddingsRequest"),
            )
        },
        "/v1/rerank": {
            "post": _op(
                "rerank",
                "Documents ranked by relevance to the query (local model or helper).",
                "inference",
                _ok(_ref("Rerank"), "Ranked results."),
                gen_errors,
                v1,
                _ref("RerankRequest"),
            )
        },
        "/admin/models": {
            "get": _op(
                "adminModels",
                "Catalog and loaded models.",
                "admin",
                _ok(_ref("AdminModels"), "Every model."),
                guard,
                keyed,
            )
        },
        "/admin/models/load": {
            "post": _op(
                "adminLoad",
                "Load a catalog model (no-op when loaded).",
                "admin",
                _ok(_ref("AdminLoaded"), "Loaded."),
                admin_post,
                keyed,
                _ref("AdminLoadRequest"),
            )
        },
        "/admin/models/unload": {
            "post": _op(
                "adminUnload",
                "Unload a model, waiting for its in-flight requests up to timeout_s.",
                "admin",
                _ok(_ref("AdminUnloaded"), "Unloaded."),
                admin_post,
                keyed,
                _ref("AdminUnloadRequest"),
            )
        },
        "/admin/health": {
            "get": _op(
                "adminHealth",
                "ok / degraded / failing with reasons.",
                "admin",
                _ok(_ref("AdminHealth"), "The report."),
                guard,
                keyed,
            )
        },
        "/admin/safe-mode/exit": {
            "post": _body_optional(
                _op(
                    "adminSafeModeExit",
                    "End safe mode now: the normal limits come into force and the auto_load models "
                    "load, without a restart.",
                    "admin",
                    _ok(
                        _ref("AdminSafeModeExited"), "Safe mode is off (was_on: whether it was on)."
                    ),
                    ("400", *guard, "413", "429", "500", "503"),
                    keyed,
                    _ref("AdminSafeModeExitRequest"),
                )
            )
        },
        "/admin/config": {
            "get": _op(
                "adminConfig",
                "The composed config, secrets redacted.",
                "admin",
                _ok(_ref("AdminConfig"), "The config."),
                guard,
                keyed,
            )
        },
        "/status": {
            "get": _op(
                "statusPage",
                "The status page (HTML; it reads /status.json). Served without a key when an "
                "admin key is set (it holds no data); without one, to loopback clients only.",
                "status",
                _ok({"type": "string"}, "The page.", "text/html"),
                status_errors,
                [],
            )
        },
        "/status.json": {
            "get": _op(
                "statusData",
                "The status page's data: the admin key, or, when none is set, a loopback client.",
                "status",
                _ok(_ref("Status"), "One snapshot."),
                status_errors,
                [*keyed, {}],
            )
        },
        **{
            path: {
                "get": _op(
                    "statusAsset" + name.split(".")[0].title() + name.split(".")[1].title(),
                    f"The status page's {name} (shipped in the package).",
                    "status",
                    _ok({"type": "string"}, name, media),
                    status_errors,
                    [],
                )
            }
            for path, name, media in (
                ("/status/app.js", "app.js", "text/javascript"),
                ("/status/app.css", "app.css", "text/css"),
                ("/status/icon.svg", "icon.svg", "image/svg+xml"),
            )
        },
    }
    schemas = {
        "Error": ERROR,
        "Usage": USAGE,
        "TextPart": _TEXT_PART,
        "ChatMessage": _MESSAGE,
        "ChatCompletionRequest": CHAT_REQUEST,
        "ChatCompletion": CHAT_COMPLETION,
        "CompletionRequest": COMPLETION_REQUEST,
        "Completion": COMPLETION,
        "EmbeddingsRequest": EMBEDDINGS_REQUEST,
        "Embeddings": EMBEDDINGS,
        "RerankRequest": RERANK_REQUEST,
        "Rerank": RERANK,
        "ModelList": MODEL_LIST,
        "Health": HEALTH,
        "Ready": READY,
        "AdminModel": ADMIN_MODEL,
        "AdminModels": ADMIN_MODELS,
        "AdminLoadRequest": ADMIN_LOAD_REQUEST,
        "AdminLoaded": ADMIN_LOADED,
        "AdminUnloadRequest": ADMIN_UNLOAD_REQUEST,
        "AdminUnloaded": ADMIN_UNLOADED,
        "AdminHealth": ADMIN_HEALTH,
        "AdminConfig": ADMIN_CONFIG,
        "AdminSafeModeExitRequest": ADMIN_SAFE_MODE_EXIT_REQUEST,
        "AdminSafeModeExited": ADMIN_SAFE_MODE_EXITED,
        "Status": STATUS,
        **agents.SCHEMAS,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "The appliance",
            "version": __version__,
            "description": "OpenAI-compatible and Anthropic-compatible inference on MLX, an "
            "admin API and probes. Every non-2xx answer is an OpenAI error object, but on "
            "/v1/messages (Anthropic's error object).",
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": n}
            for n in ("inference", "anthropic", "responses", "admin", "status", "probes", "meta")
        ],
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(schemas),
            "responses": {
                **{f"E{s}": _error_response(s) for s in _ERROR_TEXT},
                **{f"A{s}": _anthropic_error_response(s) for s in _ANTHROPIC_TEXT},
            },
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Authorization: Bearer <key>",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


class OpenAPI:
    """GET /openapi.json."""

    def __init__(self, cfg: AppConfig) -> None:
        self.body = orjson.dumps(spec(cfg))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body
