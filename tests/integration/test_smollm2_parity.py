"""Token-exact parity on the real model: the appliance's greedy output for SmolLM2 equals
mlx_lm's own generate on the same loaded model (the GGUF file through the appliance's loader,
weights as stored, the wheel's BLAS in both processes, so the arithmetic is the same)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ..conftest import NOT_ARRANGED

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MAX_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three things to pack for a hike:",
]


@pytest.fixture(scope="module")
def reference() -> Any:
    from mlx_lm import stream_generate

    from appliance.engine.builtin import fetch_smollm2
    from appliance.engine.loading import load_model, weight_plan

    path = fetch_smollm2(progress=lambda _msg: None)
    model, tokenizer = load_model(
        "smollm2", path, builtin_dir=None, plan=weight_plan(path, "quantized")[0]
    )

    def run(prompt: str) -> str:
        # mlx-lm's streaming detokenizer, as the appliance's (its first piece loses the
        # leading space, in both)
        return "".join(
            r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
        )

    return run


@pytest.fixture(scope="module")
def url(module_appliance_factory: Any) -> str:
    app = module_appliance_factory(
        "logging.file=none",
        "engine.cpu_blas=bundled",
        "models.default=smollm2",
        "models.auto_load=[smollm2]",
        "+models.catalog.smollm2.cpu_weights=quantized",
        env=NOT_ARRANGED,
    )
    return str(app.url)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["france", "code", "list"])
def test_greedy_tokens_equal_mlx_lm_generate(url: str, reference: Any, prompt: str) -> None:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS},
        timeout=240,
    )
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == reference(prompt)
