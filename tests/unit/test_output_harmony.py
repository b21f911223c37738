"""gpt-oss output through openai-harmony: channels to events, on token ids, with the
vocabulary written from a gpt-oss-like tokenizer (no download from a model hub)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from appliance.engine.output import HARMONY, OutputParser, detect_family
from appliance.engine.output.harmony import O200K_FILE, load_encoding, write_vocab_file
from appliance.errors import ModelLoadError

from ._o200k import gpt_oss_like_tokenizer, ranks_file
from ._output_util import check_calls, counter_ids, merged, summary

pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def vocab() -> Path:
    path = ranks_file()
    if path is None:
        pytest.skip("the o200k vocabulary could not be had (npm or its registry unreachable)")
    return path


@pytest.fixture(scope="module")
def tokenizer(vocab: Path) -> Any:
    return gpt_oss_like_tokenizer(vocab)


@pytest.fixture(scope="module")
def encoding(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The product path: the vocabulary file written from the model's tokenizer into the cache.
    folder = tmp_path_factory.mktemp("tiktoken")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", "")
        enc = load_encoding(tokenizer, cache_dir=folder)
        assert (folder / O200K_FILE).exists()
    return enc


def _parse(enc: Any, text: str, *, tools: bool = True, seed: int = 0) -> list[tuple[str, Any]]:
    ids = enc.encode(text, allowed_special="all")
    results = []
    rng = random.Random(seed)
    splits = [[ids], [[t] for t in ids]]
    for _ in range(4):
        pieces, i = [], 0
        while i < len(ids):
            k = rng.randint(1, 4)
            pieces.append(ids[i : i + k])
            i += k
        splits.append(pieces)
    for pieces in splits:
        p = OutputParser(
            HARMONY, tools_enabled=tools, reasoning=None, encoding=enc, id_factory=counter_ids()
        )
        assert p.consumes_tokens
        events = []
        for chunk in pieces:
            events += p.feed("ignored: harmony reads the ids", chunk)
        events += p.close()
        check_calls(events)
        results.append(merged(events))
    assert all(r == results[0] for r in results)
    return summary(results[0])


CALL = (
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"city": "Paris", "days": 2}<|call|>'
)


def test_analysis_then_call(encoding: Any) -> None:
    out = _parse(
        encoding, "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant" + CALL
    )
    assert out == [
        ("reasoning", "Need the weather."),
        ("call", "get_weather", {"city": "Paris", "days": 2}),
    ]


def test_analysis_then_final(encoding: Any) -> None:
    out = _parse(
        encoding,
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>"
        "Paris is the capital.<|return|>",
    )
    assert out == [("reasoning", "Easy."), ("text", "Paris is the capital.")]


def test_preamble_two_calls_and_recipient_in_the_role(encoding: Any) -> None:
    out = _parse(
        encoding,
        "<|channel|>commentary<|message|>Checking two things.<|end|><|start|>assistant"
        + CALL[:-8]
        + "<|call|><|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json"
        '<|message|>{"tz": "CET"}<|call|>',
    )
    assert out == [
        ("text", "Checking two things."),
        ("call", "get_weather", {"city": "Paris", "days": 2}),
        ("call", "get_time", {"tz": "CET"}),
    ]


def test_call_without_its_stop_token_and_cut_off(encoding: Any) -> None:
    # The engine stops on <|call|> and need not pass it on.
    assert _parse(encoding, CALL[: -len("<|call|>")]) == [
        ("call", "get_weather", {"city": "Paris", "days": 2})
    ]
    cut = CALL[: CALL.index("Paris") + 3]
    assert _parse(encoding, cut) == [("call", "get_weather", {"city": "Par"})]


def test_not_harmony_is_text(encoding: Any) -> None:
    assert _parse(encoding, "Just words, no channels.") == [("text", "Just words, no channels.")]


def test_tools_disabled_keeps_call_content_as_text(encoding: Any) -> None:
    assert _parse(encoding, CALL, tools=False) == [("text", '{"city": "Paris", "days": 2}')]


def test_call_content_that_is_not_json(encoding: Any) -> None:
    out = _parse(
        encoding,
        "<|channel|>commentary to=python<|message|>print(1)<|call|>",
    )
    assert out == [("call", "python", {}), ("text", "print(1)")]


def test_detect_family_and_a_wrong_vocabulary(tokenizer: Any, tmp_path: Path) -> None:
    assert detect_family(tokenizer) == HARMONY
    write_vocab_file(tokenizer, tmp_path)
    assert (tmp_path / O200K_FILE).stat().st_size > 3_000_000
    from ._output_util import hf_tokenizer

    with pytest.raises(ModelLoadError):
        write_vocab_file(hf_tokenizer(), tmp_path / "other")


def test_no_vocabulary_and_no_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "")
    with pytest.raises(ModelLoadError, match="TIKTOKEN_ENCODINGS_BASE"):
        load_encoding(None, cache_dir=tmp_path)
