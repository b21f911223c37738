"""A test model that thinks: the demo model with `<think>` / `</think>` as added tokens (two of
its rarest merges given up for them) and a Qwen3-style chat template whose thinking switch is
`enable_thinking`. Its thinking is noise, like the rest of its output; what matters is the
format: the prompt opens thinking, the output closes it.

So that it closes thinking by itself, `</think>`'s output row is a common token's (" left")
scaled up a little: wherever greedy decoding would say " left", it ends its thinking instead.
For PROMPT that happens after a few tokens (THOUGHT); other prompts think longer or never
stop (a thinking budget then forces the end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

THINK, END_THINK = "<think>", "</think>"
LEFT = 723  # " left" in the demo model's vocabulary
PROMPT = "Say something."  # greedy: thinks "umbers outpli", then ends its thinking
THOUGHT = "umbers outpli"

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
    "<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"
)


def build_thinker(demo_dir: Path, dest: Path) -> Path:
    """A copy of the demo model at `dest` that thinks (see the module docstring)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in demo_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    tok = json.loads((dest / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    top = max(by_id)
    freed = [top - 1, top]
    gone = {by_id[i] for i in freed}
    for s in gone:
        del vocab[s]
    merges = tok["model"]["merges"]

    def result(m: object) -> str:
        a, b = m.split(" ", 1) if isinstance(m, str) else m  # type: ignore[misc]
        return str(a) + str(b)

    tok["model"]["merges"] = [m for m in merges if result(m) not in gone]
    for i, text in zip(freed, (THINK, END_THINK), strict=True):
        tok["added_tokens"].append(
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    for i, text in zip(freed, (THINK, END_THINK), strict=True):
        cfg["added_tokens_decoder"][str(i)] = {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": False,
        }
    cfg["chat_template"] = TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    import mlx.core as mx

    weights = mx.load(str(dest / "model.safetensors"))
    head = weights["lm_head.weight"]
    end = freed[1]
    rows = [head[:end], (head[LEFT] * 1.05)[None]]
    if end + 1 < head.shape[0]:
        rows.append(head[end + 1 :])
    weights["lm_head.weight"] = mx.concatenate(rows, axis=0)
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    return dest
