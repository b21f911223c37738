"""Stop strings over tokens that arrive several at a time (a stream that fell behind)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from appliance.engine.chat import Prepared, Run
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
    params = SamplingParams(max_tokens=16, stop=(stop,))

    async def scenario() -> tuple[str, Run]:
        gen = Generation("demo", [1, 2, 3], params)
        for t in ids[:6]:  # six tokens came in before the reader looked
            gen.push(t, None, None, None, 0.0)
        run = Run(
            gen,
            tok,
            Prepared([1, 2, 3], params, None, None, (), False),
            deadline=asyncio.get_running_loop().time() + 30,
        )
        text = ""
        async for step in run.steps():
            assert step is not None
            text += "".join(getattr(ev, "text", "") for ev in step.events)
        return text, run

    text, run = asyncio.run(scenario())
    assert stop not in text and three.startswith(text.rstrip())
    assert run.finish == "stop" and run.stop_sequence == stop
    # The answer is the three tokens up to the stop, not the six generated.
    usage = run.usage()
    assert usage.completion_tokens == 3
    assert usage.total_tokens == 3 + 3
