"""Which tool-call format and which thinking markers a model uses.

`detect_family(tokenizer, override)` names the format a model writes its tool calls in:

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Qwen2.5, Hermes, the
                 fallback prompt for templates without tools)
    qwen3_coder  <tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>
    glm          <tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>
                 (GLM 4.5-4.7)
    llama3       {"name": ..., "parameters": {...}} as the whole answer, or after <|python_tag|>
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}] or [TOOL_CALLS]NAME[ARGS]{...}
    harmony      gpt-oss: commentary channel, to=functions.NAME (parsed on token ids)
    mlx_lm:NAME  any other mlx-lm tool parser (pythonic, kimi_k2, minimax_m2, gemma4, ...): the
                 call is buffered to its end marker and parsed whole by mlx-lm's parse_tool_call

All three `<tool_call>` families share one body parser that recognises each body form, so a
model that drifts between them still parses; the family decides the grammar and the fallback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ...errors import InvalidRequest

__all__ = [
    "GLM",
    "HARMONY",
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "QWEN3_CODER",
    "Family",
    "ReasoningMode",
    "detect_family",
    "family_by_name",
    "reasoning_mode",
    "template_source",
]


@dataclass(frozen=True)
class Family:
    """A tool-call format. `mlx_parser` names the mlx-lm module of a generic family."""

    name: str
    mlx_parser: Optional[str] = None

    @property
    def consumes_tokens(self) -> bool:
        """True when the parser needs the generated token ids (harmony), not only the text."""
        return self.name == "harmony"


HERMES = Family("hermes")
QWEN3_CODER = Family("qwen3_coder")
GLM = Family("glm")
LLAMA3 = Family("llama3")
MISTRAL = Family("mistral")
HARMONY = Family("harmony")
_BUILTIN = {f.name: f for f in (HERMES, QWEN3_CODER, GLM, LLAMA3, MISTRAL, HARMONY)}

# Names a catalog's `tool_parser:` may use: ours and mlx-lm's.
_ALIASES = {
    "json_tools": HERMES,
    "qwen": HERMES,
    "qwen2_5": HERMES,
    "qwen3": HERMES,
    "glm45": GLM,
    "glm47": GLM,
    "glm4_moe": GLM,
    "laguna": GLM,
    "llama": LLAMA3,
    "llama3_json": LLAMA3,
    "gpt_oss": HARMONY,
    "openai": HARMONY,
}
_OFF = ("none", "off", "disabled")


@dataclass(frozen=True)
class ReasoningMode:
    """How a model marks its thinking, and whether the prompt already opened it (the output
    then starts inside thinking, as with DeepSeek-R1 and Qwen3 templates that end in `<think>`).
    """

    start: str = "<think>"
    end: str = "</think>"
    started: bool = False


_THINK_PAIRS = (
    ("<think>", "</think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
)


def family_by_name(name: str) -> Optional[Family]:
    """The family a catalog's `tool_parser:` names; None for "none". Raises InvalidRequest
    (param `tool_parser`) for a name that is neither ours nor an mlx-lm parser."""
    key = name.strip().lower().replace("-", "_")
    if key in _OFF:
        return None
    if key in _BUILTIN:
        return _BUILTIN[key]
    if key in _ALIASES:
        return _ALIASES[key]
    module = key.removeprefix("mlx_lm:")
    try:
        mod = importlib.import_module(f"mlx_lm.tool_parsers.{module}")
    except ImportError:
        raise InvalidRequest(
            f"unknown tool parser {name!r}: use one of "
            f"{', '.join(sorted(_BUILTIN))}, none, or an mlx-lm parser name",
            param="tool_parser",
        ) from None
    if not hasattr(mod, "parse_tool_call"):
        raise InvalidRequest(f"unknown tool parser {name!r}", param="tool_parser")
    return Family("mlx_lm:" + module, mlx_parser=module)


def template_source(tokenizer: Any) -> str:
    """The chat template's Jinja source ("" if none); several named templates are joined."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, dict):
        return "\n".join(str(v) for v in tpl.values())
    if isinstance(tpl, (list, tuple)):
        return "\n".join(str(t.get("template", "")) for t in tpl if isinstance(t, dict))
    return ""


def _vocab(tokenizer: Any) -> dict[str, int]:
    try:
        return dict(tokenizer.get_vocab())
    except Exception:  # a tokenizer without a vocabulary view: detect from the template alone
        return {}


def detect_family(tokenizer: Any, override: Optional[str] = None) -> Optional[Family]:
    """The tool-call family of a model.

    `override` (the catalog's `tool_parser:`) wins; "none" turns tool parsing off. Otherwise
    the checkpoint's own `tool_parser_type`, then the chat template and special tokens decide
    (as mlx-lm's inference does, plus Llama 3 and harmony). A template that renders no tools
    gets the fallback prompt (see prompt.py), whose calls are hermes-style: HERMES. None when
    the template renders tools in a format no parser here knows.
    """
    if override:
        return family_by_name(override)
    init = getattr(tokenizer, "init_kwargs", None)
    declared = init.get("tool_parser_type") if isinstance(init, dict) else None
    if isinstance(declared, str) and declared:
        try:
            return family_by_name(declared)
        except InvalidRequest:
            pass
    src = template_source(tokenizer)
    vocab = _vocab(tokenizer)
    if "<|channel|>" in src or ("<|channel|>" in vocab and "<|constrain|>" in vocab):
        return HARMONY
    if "<arg_key>" in src:
        return GLM
    if "<tool_call>\n<function=" in src or "<tool_call>\\n<function=" in src:
        return QWEN3_CODER
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if "<|python_tag|>" in src or (
        "<|start_header_id|>" in src and "tools" in src and '"parameters"' in src
    ):
        return LLAMA3
    generic = _mlx_inferred(tokenizer, src)
    if generic is not None:
        return generic
    if src and _mentions_tools(src):
        return None  # the template renders tools in a format no parser here knows
    return HERMES


def _mentions_tools(src: str) -> bool:
    return "tools" in src and ("tool_call" in src or "function" in src)


def _mlx_inferred(tokenizer: Any, src: str) -> Optional[Family]:
    """The mlx-lm parser whose start marker the template (or the vocabulary) holds."""
    import pkgutil

    try:
        import mlx_lm.tool_parsers as pkg
    except ImportError:
        return None
    vocab = _vocab(tokenizer)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in ("json_tools", "qwen3_coder", "glm47", "laguna", "mistral"):
            continue  # ours, handled above
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # a parser module that fails to import is one we cannot use
            continue
        marker = getattr(mod, "tool_call_start", None)
        if isinstance(marker, str) and marker and (marker in src or marker in vocab):
            return Family("mlx_lm:" + info.name, mlx_parser=info.name)
    return None


def reasoning_mode(
    tokenizer: Any, prompt: Optional[Sequence[int]] = None
) -> Optional[ReasoningMode]:
    """The thinking markers of a model (None if it has none), and whether `prompt` (the rendered
    prompt's token ids) leaves thinking open, so the output starts inside it."""
    start = end = None
    if getattr(tokenizer, "has_thinking", False) and isinstance(
        getattr(tokenizer, "think_start", None), str
    ):
        start, end = tokenizer.think_start, tokenizer.think_end
    else:
        vocab = _vocab(tokenizer)
        for s, e in _THINK_PAIRS:
            if s in vocab and e in vocab:
                start, end = s, e
                break
    if not start or not end:
        return None
    started = False
    if prompt:
        s_ids = list(tokenizer.encode(start, add_special_tokens=False))
        e_ids = list(tokenizer.encode(end, add_special_tokens=False))
        started = _rfind(prompt, s_ids) > _rfind(prompt, e_ids)
    return ReasoningMode(start=start, end=end, started=started)


def _rfind(seq: Sequence[int], sub: Sequence[int]) -> int:
    n = len(sub)
    if not n:
        return -1
    first = sub[0]
    for i in range(len(seq) - n, -1, -1):
        if seq[i] == first and list(seq[i : i + n]) == list(sub):
            return i
    return -1
