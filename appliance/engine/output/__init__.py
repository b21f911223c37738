"""Model-format knowledge on both sides of the model: prompts with tools, and output parsed
into events (text, thinking, tool calls). Engine-level: no HTTP here.

- events.py: Text, Reasoning, ToolCallStart, ToolCallArgs, ToolCallEnd
- parser.py: OutputParser, the streaming parser (one per answer)
- families.py: Family, detect_family, ReasoningMode, reasoning_mode
- prompt.py: Message, ToolCall, ToolSpec, render, the fallback prompt
- grammar.py: the Lark grammar (llguidance) of each family's tool-call syntax
- harmony.py: gpt-oss through openai-harmony, on token ids
"""

from .events import (
    Event,
    IdFactory,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    new_call_id,
)
from .families import (
    GLM,
    HARMONY,
    HERMES,
    LLAMA3,
    MISTRAL,
    QWEN3_CODER,
    Family,
    ReasoningMode,
    detect_family,
    family_by_name,
    reasoning_mode,
)
from .parser import OutputParser
from .prompt import (
    Message,
    ToolCall,
    ToolSpec,
    fallback_system_prompt,
    parse_arguments,
    render,
    render_text,
    template_supports_tools,
)

__all__ = [
    "GLM",
    "HARMONY",
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "QWEN3_CODER",
    "Event",
    "Family",
    "IdFactory",
    "Message",
    "OutputParser",
    "Reasoning",
    "ReasoningMode",
    "Text",
    "ToolCall",
    "ToolCallArgs",
    "ToolCallEnd",
    "ToolCallStart",
    "ToolSpec",
    "detect_family",
    "fallback_system_prompt",
    "family_by_name",
    "new_call_id",
    "parse_arguments",
    "reasoning_mode",
    "render",
    "render_text",
    "template_supports_tools",
]
