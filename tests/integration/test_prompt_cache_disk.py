"""The prompt cache's disk tier across a restart of a real appliance serving the demo model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.engine.disk_cache import SUFFIX, DiskCache

pytestmark = pytest.mark.timeout(180)

BUDGET = 3 * 1024 * 1024
SYSTEM = "You are a careful agent. Tools: read_file, write_file, run_tests, search. " * 12


def _chat(url: str, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "demo", "messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return body["choices"][0]["message"]["content"], usage["prompt_tokens"], cached


def _disk_hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'^lmx_prefix_cache_disk_hits_total\{model="demo"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _settings(root: Path) -> tuple[str, ...]:
    """A disk tier in `root`, within BUDGET, every cached prefix reused."""
    return (
        f"models.prompt_cache_dir={root}",
        f"models.prompt_cache_disk_bytes={BUDGET}",
        "models.prompt_cache_min_tokens=0",
    )


def _next_turn(conv: list[dict[str, str]], answer: str, ask: str) -> list[dict[str, str]]:
    return [*conv, {"role": "assistant", "content": answer}, {"role": "user", "content": ask}]


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_a_known_conversation_hits_the_disk_after_a_restart(
    appliance_factory: Any, tmp_path: Path
) -> None:
    root = tmp_path / "prompt-cache"
    settings = _settings(root)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List the files."}]
    a = appliance_factory(*settings, home=tmp_path / "one")
    answer, prompt_tokens, cached = _chat(a.url, first)
    assert cached == 0
    assert a.stop() == 0  # SIGTERM: the memory cache is written on the way out
    folder = root / "demo"
    files = [p for p in folder.iterdir() if p.name.endswith(SUFFIX)]
    assert files, "nothing was written at shutdown"

    # Beside the good file: a torn copy of it and a file of another model.
    torn = folder / ("f" * 40 + SUFFIX)
    torn.write_bytes(files[0].read_bytes()[:-64])
    other = DiskCache(tmp_path / "elsewhere", BUDGET, "another-model", "kv_bits=None")
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 2, 40, 32)), mx.zeros((1, 2, 40, 32)))
    assert other.write(list(range(40)), [kv] * 4)
    foreign = next((tmp_path / "elsewhere").iterdir())
    foreign.rename(folder / foreign.name)

    b = appliance_factory(*settings, home=tmp_path / "two")
    assert not torn.exists() and not (folder / foreign.name).exists()
    turn2 = _next_turn(first, answer, "Now run the tests.")
    _, prompt2, cached2 = _chat(b.url, turn2)
    # The first turn of the restarted server reuses the previous prompt from disk: all of it
    # but its last token, which the template's assistant header merges with the answer.
    assert prompt_tokens - 1 <= cached2 < prompt2
    assert _disk_hits(b.url) == cached2

    # Many other conversations: the folder stays within its budget.
    for i in range(6):
        _chat(b.url, [{"role": "system", "content": f"{i} " + SYSTEM}, first[1]])
    assert b.stop() == 0
    assert _size(folder) <= BUDGET
    assert len(list(folder.iterdir())) >= 2


def test_the_most_recent_conversations_are_back_in_memory_when_the_server_is_ready(
    appliance_factory: Any, tmp_path: Path
) -> None:
    root = tmp_path / "prompt-cache"
    settings = _settings(root)
    older = [{"role": "system", "content": "0 " + SYSTEM}, {"role": "user", "content": "Hi."}]
    newer = [{"role": "system", "content": "1 " + SYSTEM}, {"role": "user", "content": "Hi."}]
    a = appliance_factory(*settings, home=tmp_path / "one")
    answers = [_chat(a.url, older)[0], _chat(a.url, newer)[0]]
    assert a.stop() == 0
    folder = root / "demo"
    sizes = [p.stat().st_size for p in folder.iterdir() if p.name.endswith(SUFFIX)]
    assert len(sizes) == 2, sizes

    # Memory for one of the two: the newer one is read back before the server says ready.
    b = appliance_factory(
        *settings, f"models.prompt_cache_bytes={max(sizes) * 3 // 2}", home=tmp_path / "two"
    )
    log = b.log()
    assert re.search(r"1 prompt cache files of 2 \(\d+ tokens\) read back from disk", log), log
    # With the files gone, only what is in memory can still be reused.
    for p in folder.iterdir():
        p.unlink()
    turn2 = [
        _next_turn(conv, answer, "Go on.")
        for conv, answer in zip((older, newer), answers, strict=True)
    ]
    _, prompt_new, cached_new = _chat(b.url, turn2[1])
    _, prompt_old, cached_old = _chat(b.url, turn2[0])
    assert 0 < cached_new < prompt_new
    assert cached_old < prompt_old // 10  # the template's opening, which both share
    # Counted as served from disk, as a read at the request would have been.
    assert _disk_hits(b.url) == cached_new
    assert "read from disk" not in b.log()


def test_with_preload_off_a_file_is_read_when_a_prompt_needs_it(
    appliance_factory: Any, tmp_path: Path
) -> None:
    root = tmp_path / "prompt-cache"
    settings = _settings(root)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi."}]
    a = appliance_factory(*settings, home=tmp_path / "one")
    answer, _, _ = _chat(a.url, first)
    assert a.stop() == 0
    b = appliance_factory(*settings, "models.prompt_cache_preload_s=0", home=tmp_path / "two")
    assert "read back from disk" not in b.log()
    turn2 = _next_turn(first, answer, "Go.")
    _, prompt2, cached2 = _chat(b.url, turn2)
    assert 0 < cached2 < prompt2
    assert _disk_hits(b.url) == cached2
    assert re.search(r"a cached prefix of \d+ tokens read from disk", b.log())
