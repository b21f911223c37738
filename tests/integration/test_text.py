"""Stop strings over tokens that arrive several at a time (a stream that fell behind)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.api.openai import _Out, _usage
from appliance.engine.text import TextStream
from appliance.engine.types import Generation, SamplingParams


def test_usage_stops_at_the_token_that_completed_the_stop_string(demo_model_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tok: Any = load_tokenizer(demo_model_dir)
    ids = list(
        tok.encode("The river ran past the old mill and on to the sea", add_special_tokens=False)
    )
    # A stop string that the third token completes (not found in the text of the first two).
    two, three = tok.decode(ids[:2]), tok.decode(ids[:3])
    stop = three[len(two) :].strip()
    assert stop and stop not in two, (two, three)

    gen = Generation("demo", [1, 2, 3], SamplingParams(max_tokens=16, stop=(stop,)))
    gen.tokens.extend(ids[:6])  # six tokens came in one step's read
    out = _Out(TextStream(tok, gen.params.stop))
    text = out.text.feed(ids[:6])
    assert out.text.stopped
    assert stop not in text and three.startswith((text + out.text.flush()).rstrip())
    # The answer is the three tokens up to the stop, not the six generated.
    assert _usage(gen, out)["completion_tokens"] == 3
    assert _usage(gen, out)["total_tokens"] == 3 + 3
