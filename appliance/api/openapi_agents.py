"""The OpenAPI part of the agents' APIs: Anthropic Messages (/v1/messages...) and OpenAI
Responses (/v1/responses...). The request schemas mirror `anthropic_parsing.py` and
`responses_parsing.py` (what they refuse, the schema forbids; what they take, it allows); the
response schemas mirror `anthropic.py` and `responses.py`. openapi.py puts them in the document.
"""

from __future__ import annotations

import copy
from typing import Any

from .anthropic_parsing import EFFORTS as ANTHROPIC_EFFORTS
from .anthropic_parsing import MAX_STOP_SEQUENCES
from .responses_parsing import EFFORTS as RESPONSES_EFFORTS

Schema = dict[str, Any]
REF = "#/components/schemas/"
TOOL_NAME = "^[A-Za-z0-9_.:-]{1,128}$"


def _ref(name: str) -> Schema:
    return {"$ref": REF + name}


def _opt(schema: Schema) -> Schema:
    """A field the parsers treat as absent when null."""
    s = copy.deepcopy(schema)
    if "enum" in s:
        s["enum"] = [*s["enum"], None]
        return s
    t = s.get("type")
    if isinstance(t, str):
        s["type"] = [t, "null"]
        return s
    return {"anyOf": [s, {"type": "null"}]}


def _obj(props: dict[str, Schema], required: tuple[str, ...] = (), closed: bool = True) -> Schema:
    s: Schema = {"type": "object", "properties": props}
    if required:
        s["required"] = list(required)
    if closed:
        s["additionalProperties"] = False
    return s


STR = {"type": "string"}
BOOL = {"type": "boolean"}
NULL = {"type": "null"}
ANY: Schema = {}


def _int(lo: int, hi: int) -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi}


# -- Anthropic Messages (anthropic_parsing.py)

_CACHE_CONTROL = _opt(
    _obj({"type": {"const": "ephemeral"}, "ttl": _opt({"enum": ["5m", "1h"]})}, ("type",))
)
_A_TEXT = _obj(
    {
        "type": {"const": "text"},
        "text": STR,
        "cache_control": _CACHE_CONTROL,
        "citations": _opt({"type": "array"}),
    },
    ("type", "text"),
)
_A_TOOL_USE = _obj(
    {
        "type": {"const": "tool_use"},
        "id": STR,
        "name": STR,
        "input": {"type": "object"},
        "cache_control": _CACHE_CONTROL,
        "caller": ANY,
        "toolset_name": ANY,
    },
    ("type", "id", "name"),
)
_A_TOOL_RESULT = _obj(
    {
        "type": {"const": "tool_result"},
        "tool_use_id": {"type": "string", "minLength": 1},
        "content": _opt({"anyOf": [STR, {"type": "array", "items": _A_TEXT}]}),
        "is_error": _opt(BOOL),
        "cache_control": _CACHE_CONTROL,
        "toolset_name": ANY,
    },
    ("type", "tool_use_id"),
)
_A_THINKING = _obj(
    {
        "type": {"const": "thinking"},
        "thinking": STR,
        "signature": _opt({"type": "string", "maxLength": 1 << 20}),
        "cache_control": ANY,
    },
    ("type", "thinking"),
)
_A_REDACTED = _obj(
    {"type": {"const": "redacted_thinking"}, "data": STR, "cache_control": ANY},
    ("type", "data"),
)
ANTHROPIC_MESSAGE_PARAM: Schema = _obj(
    {
        "role": {"enum": ["user", "assistant", "system"]},
        "content": {
            "anyOf": [
                STR,
                {
                    "type": "array",
                    "items": {
                        "anyOf": [_A_TEXT, _A_TOOL_USE, _A_TOOL_RESULT, _A_THINKING, _A_REDACTED]
                    },
                    "description": "Text, tool_use, tool_result, thinking and redacted_thinking "
                    "blocks (images and documents: 400, the models here read text).",
                },
            ]
        },
    },
    ("role", "content"),
)
_A_TOOL = _obj(
    {
        "type": _opt({"enum": ["custom"]}),
        "name": {"type": "string", "pattern": TOOL_NAME},
        "description": _opt(STR),
        "input_schema": {"type": "object"},
        "cache_control": _CACHE_CONTROL,
        "strict": _opt(BOOL),
        "eager_input_streaming": _opt(BOOL),
        "defer_loading": _opt(BOOL),
        "input_examples": _opt({"type": "array", "items": {"type": "object"}}),
        "allowed_callers": _opt({"type": "array", "items": {"enum": ["direct"]}}),
    },
    ("name", "input_schema"),
)
_PARALLEL = {"disable_parallel_tool_use": _opt(BOOL)}
_A_TOOL_CHOICE = _opt(
    {
        "anyOf": [
            _obj({"type": {"const": "auto"}, **_PARALLEL}, ("type",)),
            _obj({"type": {"const": "any"}, **_PARALLEL}, ("type",)),
            _obj(
                {
                    "type": {"const": "tool"},
                    "name": {"type": "string", "maxLength": 128},
                    **_PARALLEL,
                },
                ("type", "name"),
            ),
            _obj({"type": {"const": "none"}}, ("type",)),
        ]
    }
)
_DISPLAY = _opt({"enum": ["summarized", "omitted"]})
_A_THINKING_CONFIG = _opt(
    {
        "anyOf": [
            _obj(
                {
                    "type": {"const": "enabled"},
                    "budget_tokens": _int(1, 1 << 24),
                    "display": _DISPLAY,
                },
                ("type", "budget_tokens"),
            ),
            _obj({"type": {"const": "adaptive"}, "display": _DISPLAY}, ("type",)),
            _obj({"type": {"const": "disabled"}}, ("type",)),
        ],
        "description": "enabled: thinking capped at budget_tokens (enforced where the model's "
        "end-of-thinking marker is one token); adaptive: thinking, no cap; disabled or absent: "
        "the template's thinking switch off.",
    }
)


def _anthropic_request(count: bool) -> Schema:
    props: dict[str, Schema] = {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "max_tokens": _int(1, 1 << 24),
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 100_000,
            "items": _ref("AnthropicMessageParam"),
        },
        "system": _opt({"anyOf": [STR, {"type": "array", "items": _A_TEXT}]}),
        "stream": _opt(BOOL),
        "stop_sequences": _opt(
            {
                "type": "array",
                "maxItems": MAX_STOP_SEQUENCES,
                "items": {"type": "string", "minLength": 1, "maxLength": 256},
            }
        ),
        "temperature": _opt({"type": "number", "minimum": 0, "maximum": 1}),
        "top_p": _opt({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _opt(_int(0, 1 << 20)),
        "metadata": _opt(
            _obj({"user_id": _opt({"type": "string", "maxLength": 512})}),
        ),
        "tools": _opt({"type": "array", "maxItems": 512, "items": _A_TOOL}),
        "tool_choice": _A_TOOL_CHOICE,
        "thinking": _A_THINKING_CONFIG,
        "output_config": _opt(
            _obj(
                {
                    "effort": _opt({"enum": list(ANTHROPIC_EFFORTS)}),
                    "format": _opt(
                        _obj(
                            {"type": {"const": "json_schema"}, "schema": {"type": "object"}},
                            ("type", "schema"),
                        )
                    ),
                }
            )
        ),
        "service_tier": _opt({"enum": ["auto", "standard_only"]}),
        "speed": _opt({"enum": ["standard", "fast"]}),
        "inference_geo": _opt({"type": "string", "maxLength": 256}),
        "user_profile_id": _opt({"type": "string", "maxLength": 256}),
        "workspace_id": _opt({"type": "string", "maxLength": 256}),
        "cache_control": _CACHE_CONTROL,
        "container": {**NULL, "description": "Not supported (400)."},
        "diagnostics": {**NULL, "description": "Not supported (400)."},
        "context_management": {**NULL, "description": "Not supported (400)."},
        "mcp_servers": _opt({"type": "array", "maxItems": 0, "description": "None here."}),
    }
    required = ("model", "messages") if count else ("model", "max_tokens", "messages")
    if count:
        props["max_tokens"] = _opt(props["max_tokens"])
    return _obj(props, required)


_A_USAGE = _obj(
    {
        "input_tokens": {"type": "integer", "minimum": 0},
        "output_tokens": {"type": "integer", "minimum": 0},
        "cache_read_input_tokens": {"type": "integer", "minimum": 0},
        "cache_creation_input_tokens": {"type": "integer", "minimum": 0},
    },
    ("input_tokens", "output_tokens"),
    closed=False,
)
_A_CONTENT_BLOCK = {
    "anyOf": [
        _obj({"type": {"const": "text"}, "text": STR}, ("type", "text")),
        _obj(
            {"type": {"const": "thinking"}, "thinking": STR, "signature": STR},
            ("type", "thinking", "signature"),
        ),
        _obj(
            {
                "type": {"const": "tool_use"},
                "id": {"type": "string", "pattern": "^toolu_"},
                "name": STR,
                "input": {"type": "object"},
            },
            ("type", "id", "name", "input"),
        ),
    ]
}
STOP_REASONS = ["end_turn", "max_tokens", "stop_sequence", "tool_use"]
ANTHROPIC_MESSAGE: Schema = _obj(
    {
        "id": {"type": "string", "pattern": "^msg_"},
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "model": STR,
        "content": {"type": "array", "items": _A_CONTENT_BLOCK},
        "stop_reason": {"enum": STOP_REASONS},
        "stop_sequence": {"type": ["string", "null"]},
        "usage": _A_USAGE,
    },
    ("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"),
)
ANTHROPIC_ERROR: Schema = _obj(
    {
        "type": {"const": "error"},
        "error": _obj({"type": STR, "message": STR}, ("type", "message")),
        "request_id": STR,
    },
    ("type", "error"),
)
COUNT_TOKENS: Schema = _obj({"input_tokens": {"type": "integer", "minimum": 0}}, ("input_tokens",))
_A_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
]
ANTHROPIC_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": _A_EVENTS},
        "data": {
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": _A_EVENTS}},
            },
        },
    },
}


# -- OpenAI Responses (responses_parsing.py)


def _parts(kinds: list[str]) -> Schema:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": kinds}, "text": STR, "refusal": STR},
        },
    }


_R_MESSAGE = _obj(
    {
        "type": {"const": "message"},
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {
            "anyOf": [
                STR,
                _parts(["input_text", "output_text", "refusal", "input_image", "input_file"]),
            ]
        },
        "id": ANY,
        "status": ANY,
        "phase": ANY,
    },
    ("role", "content"),
)
_CALL_COMMON = {"id": ANY, "status": ANY, "namespace": ANY, "caller": ANY}
_R_CALL = _obj(
    {
        "type": {"const": "function_call"},
        "call_id": STR,
        "name": STR,
        "arguments": STR,
        **_CALL_COMMON,
    },
    ("type", "call_id", "name", "arguments"),
)
_R_CUSTOM_CALL = _obj(
    {
        "type": {"const": "custom_tool_call"},
        "call_id": STR,
        "name": STR,
        "input": STR,
        "id": ANY,
        "namespace": ANY,
        "caller": ANY,
    },
    ("type", "call_id", "name", "input"),
)
_OUTPUT_VALUE = {"anyOf": [STR, _parts(["input_text", "output_text", "text"])]}
_R_OUTPUT = _obj(
    {
        "type": {"enum": ["function_call_output", "custom_tool_call_output"]},
        "call_id": STR,
        "output": _OUTPUT_VALUE,
        "name": ANY,
        **_CALL_COMMON,
    },
    ("type", "call_id", "output"),
)
_R_REASONING = _obj(
    {
        "type": {"const": "reasoning"},
        "id": ANY,
        "summary": _opt(_parts(["summary_text"])),
        "content": _opt(_parts(["reasoning_text"])),
        "encrypted_content": _opt(STR),
        "status": ANY,
    },
    ("type",),
)
RESPONSE_ITEM: Schema = {
    "anyOf": [_R_MESSAGE, _R_CALL, _R_CUSTOM_CALL, _R_OUTPUT, _R_REASONING],
    "description": "message (input_text / output_text parts), function_call, "
    "function_call_output, custom_tool_call, custom_tool_call_output, reasoning.",
}
_R_TOOL_COMMON = {
    "defer_loading": _opt(BOOL),
    "allowed_callers": _opt({"type": "array", "items": {"enum": ["direct"]}}),
    "async": _opt(BOOL),
}
_R_FUNCTION_TOOL = _obj(
    {
        "type": {"const": "function"},
        "name": {"type": "string", "pattern": TOOL_NAME},
        "description": _opt(STR),
        "parameters": _opt({"type": "object"}),
        "strict": _opt(BOOL),
        "output_schema": NULL,
        **_R_TOOL_COMMON,
    },
    ("type", "name"),
)
_R_CUSTOM_TOOL = _obj(
    {
        "type": {"const": "custom"},
        "name": {"type": "string", "pattern": TOOL_NAME},
        "description": _opt({"type": "string", "maxLength": 1 << 20}),
        "format": _opt(
            {
                "anyOf": [
                    _obj({"type": {"const": "text"}}, ("type",)),
                    _obj(
                        {
                            "type": {"const": "grammar"},
                            "syntax": {"enum": ["lark", "regex"]},
                            "definition": STR,
                        },
                        ("type", "syntax", "definition"),
                    ),
                ],
                "description": "A grammar is given to the model with the description, not "
                "enforced.",
            }
        ),
        **_R_TOOL_COMMON,
    },
    ("type", "name"),
)
_R_TOOL_CHOICE = _opt(
    {
        "anyOf": [
            {"enum": ["auto", "none", "required"]},
            _obj(
                {
                    "type": {"enum": ["function", "custom"]},
                    "name": {"type": "string", "maxLength": 128},
                },
                ("type", "name"),
            ),
            _obj(
                {
                    "type": {"const": "allowed_tools"},
                    "mode": {"enum": ["auto", "required"]},
                    "tools": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"enum": ["function", "custom"]}},
                        },
                    },
                },
                ("type", "tools"),
            ),
        ]
    }
)
_R_FORMAT = {
    "anyOf": [
        _obj({"type": {"const": "text"}}, ("type",)),
        _obj({"type": {"const": "json_object"}}, ("type",)),
        _obj(
            {
                "type": {"const": "json_schema"},
                "name": {"type": "string", "maxLength": 64},
                "schema": {"type": "object"},
                "strict": _opt(BOOL),
                "description": _opt({"type": "string", "maxLength": 1 << 16}),
            },
            ("type", "name", "schema"),
        ),
    ]
}
_SUMMARY = _opt({"enum": ["auto", "concise", "detailed"]})
_HINT = _opt({"type": "string", "maxLength": 1024})
_UNSUPPORTED = {**NULL, "description": "Not supported (400)."}
RESPONSE_REQUEST: Schema = _obj(
    {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "input": _opt(
            {
                "anyOf": [
                    STR,
                    {"type": "array", "maxItems": 100_000, "items": _ref("ResponseInputItem")},
                ]
            }
        ),
        "instructions": _opt(STR),
        "tools": _opt(
            {
                "type": "array",
                "maxItems": 512,
                "items": {"anyOf": [_R_FUNCTION_TOOL, _R_CUSTOM_TOOL]},
            }
        ),
        "tool_choice": _R_TOOL_CHOICE,
        "parallel_tool_calls": _opt(BOOL),
        "text": _opt(
            _obj(
                {"format": _opt(_R_FORMAT), "verbosity": _opt({"enum": ["low", "medium", "high"]})}
            )
        ),
        "reasoning": _opt(
            _obj(
                {
                    "effort": _opt({"enum": list(RESPONSES_EFFORTS)}),
                    "summary": _SUMMARY,
                    "generate_summary": _SUMMARY,
                    "context": _opt({"enum": ["auto"]}),
                    "mode": _opt({"enum": ["standard"]}),
                }
            )
        ),
        "max_output_tokens": _opt(_int(1, 1 << 24)),
        "max_tool_calls": _opt(_int(0, 1 << 20)),
        "temperature": _opt({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _opt({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_logprobs": _opt({**_int(0, 0), "description": "Not supported beyond 0."}),
        "stream": _opt(BOOL),
        "stream_options": _opt(_obj({"include_obfuscation": _opt(BOOL)})),
        "store": _opt({**BOOL, "description": "Default true: kept for previous_response_id."}),
        "previous_response_id": _opt({"type": "string", "maxLength": 256}),
        "metadata": _opt(
            {
                "type": "object",
                "maxProperties": 16,
                "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512},
            }
        ),
        "include": _opt({"type": "array", "items": {"enum": ["reasoning.encrypted_content"]}}),
        "prompt_cache_key": _HINT,
        "prompt_cache_retention": _opt({"enum": ["in_memory", "in-memory", "24h"]}),
        "prompt_cache_options": _opt({"type": "object"}),
        "safety_identifier": _HINT,
        "service_tier": _opt({"enum": ["auto", "default"]}),
        "truncation": _opt({"enum": ["auto", "disabled"]}),
        "user": _HINT,
        "background": _opt({"enum": [False]}),
        "background_options": _UNSUPPORTED,
        "conversation": _UNSUPPORTED,
        "prompt": _UNSUPPORTED,
        "moderation": _UNSUPPORTED,
        "image": _UNSUPPORTED,
        "context_management": _UNSUPPORTED,
        "access_programs": _UNSUPPORTED,
    },
    ("model",),
)
_R_OUT_ITEM = {
    "anyOf": [
        _obj(
            {
                "id": {"type": "string", "pattern": "^msg_"},
                "type": {"const": "message"},
                "role": {"const": "assistant"},
                "status": {"enum": ["in_progress", "completed", "incomplete"]},
                "content": {
                    "type": "array",
                    "items": _obj(
                        {
                            "type": {"const": "output_text"},
                            "text": STR,
                            "annotations": {"type": "array"},
                        },
                        ("type", "text", "annotations"),
                    ),
                },
            },
            ("id", "type", "role", "status", "content"),
        ),
        _obj(
            {
                "id": {"type": "string", "pattern": "^fc_"},
                "type": {"const": "function_call"},
                "call_id": STR,
                "name": STR,
                "arguments": STR,
                "status": {"enum": ["in_progress", "completed", "incomplete"]},
            },
            ("type", "call_id", "name", "arguments"),
        ),
        _obj(
            {
                "id": {"type": "string", "pattern": "^ctc_"},
                "type": {"const": "custom_tool_call"},
                "call_id": STR,
                "name": STR,
                "input": STR,
            },
            ("type", "call_id", "name", "input"),
        ),
        _obj(
            {
                "id": {"type": "string", "pattern": "^rs_"},
                "type": {"const": "reasoning"},
                "summary": _parts(["summary_text"]),
                "encrypted_content": STR,
            },
            ("id", "type", "summary"),
        ),
    ]
}
_N = {"type": "integer", "minimum": 0}
RESPONSE_USAGE: Schema = _obj(
    {
        "input_tokens": _N,
        "input_tokens_details": _obj({"cached_tokens": _N}, ("cached_tokens",), closed=False),
        "output_tokens": _N,
        "output_tokens_details": _obj(
            {"reasoning_tokens": _N}, ("reasoning_tokens",), closed=False
        ),
        "total_tokens": _N,
    },
    (
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "output_tokens_details",
        "total_tokens",
    ),
    closed=False,
)
RESPONSE: Schema = _obj(
    {
        "id": {"type": "string", "pattern": "^resp_"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
        "model": STR,
        "output": {"type": "array", "items": _R_OUT_ITEM},
        "usage": {"anyOf": [RESPONSE_USAGE, NULL]},
        "error": {
            "anyOf": [_obj({"code": STR, "message": STR}, ("code", "message"), closed=False), NULL]
        },
        "incomplete_details": {
            "anyOf": [_obj({"reason": {"const": "max_output_tokens"}}, ("reason",)), NULL]
        },
        "parallel_tool_calls": BOOL,
        "tool_choice": ANY,
        "tools": {"type": "array"},
        "store": BOOL,
    },
    ("id", "object", "created_at", "status", "model", "output", "parallel_tool_calls", "tools"),
    closed=False,
)
RESPONSE_DELETED: Schema = _obj(
    {"id": STR, "object": {"const": "response.deleted"}, "deleted": {"const": True}},
    ("id", "object", "deleted"),
)
_R_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.output_item.done",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_text.delta",
    "response.output_text.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.custom_tool_call_input.delta",
    "response.custom_tool_call_input.done",
    "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done",
    "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done",
    "response.completed",
    "response.incomplete",
    "response.failed",
]
RESPONSE_EVENT: Schema = {
    "type": "object",
    "properties": {
        "event": {"enum": _R_EVENTS},
        "data": {
            "contentMediaType": "application/json",
            "contentSchema": {
                "type": "object",
                "required": ["type", "sequence_number"],
                "properties": {
                    "type": {"enum": _R_EVENTS},
                    "sequence_number": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "description": "Comments (keep-alives) may come between events.",
}

SCHEMAS: dict[str, Schema] = {
    "AnthropicMessageParam": ANTHROPIC_MESSAGE_PARAM,
    "AnthropicMessagesRequest": _anthropic_request(count=False),
    "AnthropicCountTokensRequest": _anthropic_request(count=True),
    "AnthropicMessage": ANTHROPIC_MESSAGE,
    "AnthropicCountTokens": COUNT_TOKENS,
    "AnthropicError": ANTHROPIC_ERROR,
    "ResponseInputItem": RESPONSE_ITEM,
    "ResponseRequest": RESPONSE_REQUEST,
    "Response": RESPONSE,
    "ResponseDeleted": RESPONSE_DELETED,
}
