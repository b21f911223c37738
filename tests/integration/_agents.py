"""What the Anthropic and Responses tests share: the module's appliance (the demo model under
agents' names, and the thinking test model), raw SSE events, and agents' request bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
from httpx_sse import connect_sse

from tests.thinker import build_thinker

# Patterns are tried in the order written: the thinking names first.
ALIASES = (
    "+models.aliases={claude-think*: thinker, gpt-5-think*: thinker, claude-*: demo, "
    "gpt-5*: demo, exact-name: demo}"
)


def start(
    factory: Callable[..., Any],
    demo_model_dir: Path,
    home: Path,
    *extra: str,
    env: Optional[dict[str, str]] = None,
) -> Any:
    """An appliance serving the demo model (default) and the thinking model, with aliases, and
    fault injection on (a test that breaks the thinking model mid-answer comes last)."""
    thinker = build_thinker(demo_model_dir, home / "thinker")
    return factory(
        ALIASES,
        f"+models.catalog.thinker.path={thinker}",
        "+models.catalog.thinker.context_length=8192",
        "+models.catalog.thinker.max_tokens=4096",
        "logging.file=none",
        *extra,
        env={"APPLIANCE_FAULT_INJECTION": "1", **(env or {})},
    )


def sse(http: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> list[tuple[str, Any]]:
    """(event name, parsed data) of every event of a stream."""
    with connect_sse(http, "POST", path, json={**body, "stream": True}, **kw) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(e.event, json.loads(e.data)) for e in source.iter_sse()]


def shape(events: list[tuple[str, Any]], skip: tuple[str, ...] = ("ping",)) -> list[str]:
    """The event names in order, runs of one name collapsed (a delta per token varies)."""
    out: list[str] = []
    for name, _ in events:
        if name in skip:
            continue
        if not out or out[-1] != name:
            out.append(name)
    return out


# -- what agents send: tools with realistic schemas (written from the public docs)

AGENT_TOOLS: list[dict[str, Any]] = [
    {
        "name": "Bash",
        "description": "Executes a bash command in a persistent shell session.",
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The command to execute"},
                "timeout": {"type": "number", "description": "Optional timeout in ms"},
                "description": {"type": "string"},
                "run_in_background": {"type": "boolean"},
            },
            "required": ["command"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    },
    {
        "name": "Read",
        "description": "Reads a file from the local filesystem.",
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string", "description": "The absolute path"},
                "offset": {"type": "number"},
                "limit": {"type": "number"},
            },
            "required": ["file_path"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Write",
        "description": "Writes a file to the local filesystem.",
        "input_schema": {
            "type": "object",
            "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["file_path", "content"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Edit",
        "description": "Performs exact string replacements in files.",
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string"},
                "old_string": {"type": "string"},
                "new_string": {"type": "string"},
                "replace_all": {"type": "boolean", "default": False},
            },
            "required": ["file_path", "old_string", "new_string"],
            "additionalProperties": False,
        },
    },
    {
        "name": "MultiEdit",
        "description": "Several edits to one file in one operation.",
        "input_schema": {
            "type": "object",
            "properties": {
                "file_path": {"type": "string"},
                "edits": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "old_string": {"type": "string"},
                            "new_string": {"type": "string"},
                            "replace_all": {"type": "boolean"},
                        },
                        "required": ["old_string", "new_string"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["file_path", "edits"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Glob",
        "description": "Fast file pattern matching.",
        "input_schema": {
            "type": "object",
            "properties": {"pattern": {"type": "string"}, "path": {"type": "string"}},
            "required": ["pattern"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Grep",
        "description": "A powerful search tool built on ripgrep.",
        "input_schema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "path": {"type": "string"},
                "glob": {"type": "string"},
                "output_mode": {
                    "type": "string",
                    "enum": ["content", "files_with_matches", "count"],
                },
                "-B": {"type": "number"},
                "-A": {"type": "number"},
                "-C": {"type": "number"},
                "-n": {"type": "boolean"},
                "-i": {"type": "boolean"},
                "type": {"type": "string"},
                "head_limit": {"type": "number"},
                "multiline": {"type": "boolean"},
            },
            "required": ["pattern"],
            "additionalProperties": False,
        },
    },
    {
        "name": "LS",
        "description": "Lists files and directories in a given path.",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "ignore": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["path"],
            "additionalProperties": False,
        },
    },
    {
        "name": "TodoWrite",
        "description": "Create and manage a structured task list.",
        "input_schema": {
            "type": "object",
            "properties": {
                "todos": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "content": {"type": "string", "minLength": 1},
                            "status": {
                                "type": "string",
                                "enum": ["pending", "in_progress", "completed"],
                            },
                            "id": {"type": "string"},
                        },
                        "required": ["content", "status", "id"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["todos"],
            "additionalProperties": False,
        },
    },
    {
        "name": "WebFetch",
        "description": "Fetches content from a URL and processes it.",
        "input_schema": {
            "type": "object",
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "prompt": {"type": "string"},
            },
            "required": ["url", "prompt"],
            "additionalProperties": False,
        },
    },
    {
        "name": "WebSearch",
        "description": "Searches the web.",
        "input_schema": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 2},
                "allowed_domains": {"type": "array", "items": {"type": "string"}},
                "blocked_domains": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    {
        "name": "Task",
        "description": "Launch a new agent to handle a complex task.",
        "input_schema": {
            "type": "object",
            "properties": {
                "description": {"type": "string"},
                "prompt": {"type": "string"},
                "subagent_type": {"type": "string"},
            },
            "required": ["description", "prompt", "subagent_type"],
            "additionalProperties": False,
        },
    },
    {
        "name": "NotebookEdit",
        "description": "Replaces the contents of a cell in a Jupyter notebook.",
        "input_schema": {
            "type": "object",
            "properties": {
                "notebook_path": {"type": "string"},
                "cell_id": {"type": "string"},
                "new_source": {"type": "string"},
                "cell_type": {"type": "string", "enum": ["code", "markdown"]},
                "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]},
            },
            "required": ["notebook_path", "new_source"],
            "additionalProperties": False,
        },
    },
    {
        "name": "ExitPlanMode",
        "description": "Ends plan mode once the plan is ready.",
        "input_schema": {
            "type": "object",
            "properties": {"plan": {"type": "string"}},
            "required": ["plan"],
            "additionalProperties": False,
        },
    },
    {
        "name": "BashOutput",
        "description": "Retrieves output from a running background shell.",
        "input_schema": {
            "type": "object",
            "properties": {"bash_id": {"type": "string"}, "filter": {"type": "string"}},
            "required": ["bash_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": "KillShell",
        "description": "Kills a running background shell.",
        "input_schema": {
            "type": "object",
            "properties": {"shell_id": {"type": "string"}},
            "required": ["shell_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": "SlashCommand",
        "description": "Execute a slash command.",
        "input_schema": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    {
        "name": "mcp__github__create_issue",
        "description": "Create an issue in a GitHub repository.",
        "input_schema": {
            "type": "object",
            "properties": {
                "owner": {"type": "string"},
                "repo": {"type": "string"},
                "title": {"type": "string"},
                "body": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "assignees": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["owner", "repo", "title"],
        },
    },
    {
        "name": "mcp__github__search_code",
        "description": "Search code across repositories.",
        "input_schema": {
            "type": "object",
            "properties": {
                "q": {"type": "string"},
                "per_page": {"type": "integer", "minimum": 1, "maximum": 100},
                "page": {"type": "integer", "minimum": 1},
            },
            "required": ["q"],
        },
    },
    {
        "name": "mcp__db__query",
        "description": "Run a read-only SQL query.",
        "input_schema": {
            "type": "object",
            "properties": {
                "sql": {"type": "string"},
                "params": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
                },
            },
            "required": ["sql"],
        },
    },
]
