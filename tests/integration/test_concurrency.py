"""Many clients at once: continuous batching, admission limits (429 at once), disconnects."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(120)

APPLIANCE_OVERRIDES = ("logging.file=none",)

# A request of LONG tokens takes a second or more on the demo model; one of 2000 many seconds.
LONG = 300


def _chat_body(i: int, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Story number {i} about a boat"}],
        "max_tokens": max_tokens,
    }


def test_eight_clients_at_once_get_their_own_answers(module_appliance: Any) -> None:
    url = module_appliance.url + "/v1/chat/completions"
    alone = []
    with httpx.Client(timeout=60) as c:
        for i in range(8):
            r = c.post(url, json=_chat_body(i))
            assert r.status_code == 200, r.text
            alone.append(r.json()["choices"][0]["message"]["content"])
    assert len(set(alone)) > 1  # different prompts, different answers: the check means something

    barrier = threading.Barrier(8)

    def one(i: int) -> str:
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            r = c.post(url, json=_chat_body(i))
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone


def test_eight_streams_at_once(module_appliance: Any) -> None:
    url = module_appliance.url + "/v1/completions"
    prompts = [f"Bread number {i}" for i in range(8)]
    with httpx.Client(timeout=60) as c:
        alone = [
            c.post(url, json={"prompt": p, "max_tokens": 12}).json()["choices"][0]["text"]
            for p in prompts
        ]
    client = openai.OpenAI(base_url=module_appliance.url + "/v1", api_key="x", max_retries=0)

    def one(p: str) -> str:
        stream = client.completions.create(model="demo", prompt=p, max_tokens=12, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, prompts)) == alone


def test_seeded_sampling_repeats_inside_a_batch(module_appliance: Any) -> None:
    """A seeded request draws from its own random stream: the same text alone or batched."""
    url = module_appliance.url + "/v1/chat/completions"
    seeded = {**_chat_body(99, 16), "temperature": 1.0, "top_p": 0.9, "seed": 4242}
    with httpx.Client(timeout=60) as c:
        alone = c.post(url, json=seeded).json()["choices"][0]["message"]["content"]
    barrier = threading.Barrier(5)

    def one(i: int) -> str:
        body = seeded if i == 0 else {**_chat_body(i, 24), "temperature": 1.0}
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            r = c.post(url, json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(5) as pool:
        assert list(pool.map(one, range(5)))[0] == alone


@pytest.fixture(scope="module")
def one_slot_one_place(module_appliance_factory: Any) -> Any:
    return module_appliance_factory(
        "logging.file=none",
        "limits.max_running=1",
        "limits.max_queued=1",
        "limits.queue_timeout_s=60",
        "models.catalog.demo.max_tokens=2048",
    )


def test_burst_gets_429_at_once(one_slot_one_place: Any) -> None:
    url = one_slot_one_place.url + "/v1/chat/completions"
    n = 10
    barrier = threading.Barrier(n)
    t0 = 0.0

    def one(i: int) -> tuple[float, httpx.Response]:
        nonlocal t0
        with httpx.Client(timeout=60) as c:
            if barrier.wait() == 0:
                t0 = time.monotonic()
            r = c.post(url, json=_chat_body(i, LONG))
            return time.monotonic(), r

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    ok = sorted(t for t, r in results if r.status_code == 200)
    busy = [(t, r) for t, r in results if r.status_code == 429]
    assert len(ok) == 2, [r.status_code for _, r in results]  # one running, one queued
    assert len(busy) == n - 2
    for t, r in busy:
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "server_busy" and err["type"] == "rate_limit_error"
        # Refused at once: before the running request finished, not after waiting for a slot.
        assert t < ok[0], (t - t0, ok[0] - t0)
    assert max(t for t, _ in busy) - t0 < (ok[0] - t0) / 2 + 0.5
    # Still serving afterwards, and the slots are free again.
    with httpx.Client(timeout=60) as c:
        for i in range(2):
            assert c.post(url, json=_chat_body(i, 4)).status_code == 200
    assert one_slot_one_place.proc.poll() is None


def _waiting(base: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("lmx_num_requests_waiting "):
            return float(line.split()[1])
    raise AssertionError("no lmx_num_requests_waiting in /metrics")


def test_a_client_that_leaves_the_queue_gives_its_place_up(one_slot_one_place: Any) -> None:
    base = one_slot_one_place.url
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with client.completions.create(
        model="demo", prompt="Hold", max_tokens=2000, stream=True
    ) as held:
        next(iter(held))  # admitted and running: the only slot is taken
        with pytest.raises(httpx.ReadTimeout):  # queued; the client gives up and hangs up
            httpx.post(
                base + "/v1/completions", json={"prompt": "Queued", "max_tokens": 2}, timeout=1.0
            )
        # Well before the held stream's 2000 tokens end (which would admit the queued one).
        deadline = time.monotonic() + 3
        while _waiting(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Its queue place is free while the slot is still held: the next client can queue.
        assert _waiting(base) == 0
        with pytest.raises(httpx.ReadTimeout):  # queued, not refused with a 429
            httpx.post(
                base + "/v1/completions", json={"prompt": "Next", "max_tokens": 2}, timeout=1.0
            )
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'status="499"' in metrics  # the ones that left are counted, as nginx's 499
    assert (
        _first_200_after(base + "/v1/completions", {"prompt": "x", "max_tokens": 2}, within=5) < 5
    )


@pytest.fixture(scope="module")
def one_slot(module_appliance_factory: Any) -> Any:
    return module_appliance_factory(
        "logging.file=none",
        "limits.max_running=1",
        "limits.max_queued=0",
        "models.catalog.demo.max_tokens=2048",
    )


def _first_200_after(url: str, body: dict[str, Any], within: float) -> float:
    """Seconds until a request is admitted (200), retrying 429s; fails past `within`."""
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as c:
        while True:
            r = c.post(url, json=body)
            if r.status_code == 200:
                return time.monotonic() - t0
            assert r.status_code == 429, r.text
            assert time.monotonic() - t0 < within, "the slot was not freed"
            time.sleep(0.05)


def test_full_queue_is_a_rate_limit_error_for_openai(one_slot: Any) -> None:
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0)
    with client.completions.create(
        model="demo", prompt="Hold", max_tokens=2000, stream=True
    ) as held:
        next(iter(held))  # admitted and running
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="demo", prompt="Next", max_tokens=2)
        assert info.value.status_code == 429
        assert info.value.code == "server_busy"
        assert info.value.response.headers.get("Retry-After")
    # Closing the held stream gave its slot back.
    assert (
        _first_200_after(
            one_slot.url + "/v1/completions", {"prompt": "Next", "max_tokens": 2}, within=5
        )
        < 5
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_disconnect_mid_stream_frees_the_slot(one_slot: Any, path: str) -> None:
    body: dict[str, Any] = (
        {"prompt": "A long tale", "max_tokens": 2000}
        if path == "/v1/completions"
        else _chat_body(0, 2000)
    )
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", one_slot.url + path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: {") for line in got)
        # The stream is closed after a few tokens; 2000 tokens would take many seconds more.
    # The next request starts at once (retrying only the moment until the server notices).
    assert (
        _first_200_after(
            one_slot.url + path,
            _chat_body(1, 2) if "chat" in path else {"prompt": "x", "max_tokens": 2},
            within=5,
        )
        < 5
    )


def test_too_long_prompt_is_refused_before_taking_a_slot(one_slot: Any) -> None:
    """The context check comes before admission (and any model work): with the only slot
    taken and no queue, a too-long prompt is still a 400, not a 429."""
    client = openai.OpenAI(base_url=one_slot.url + "/v1", api_key="x", max_retries=0)
    too_long = " ".join(["river"] * 2100)  # the demo model's context_length is 2048
    with client.completions.create(
        model="demo", prompt="Hold", max_tokens=2000, stream=True
    ) as held:
        next(iter(held))
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": too_long}],
                max_tokens=2,
            )
        assert info.value.code == "context_length_exceeded"
        assert info.value.param == "messages"
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="demo", prompt=too_long, max_tokens=2)
        assert info.value.code == "context_length_exceeded"
        assert info.value.param == "prompt"
    assert (
        _first_200_after(
            one_slot.url + "/v1/completions", {"prompt": "Next", "max_tokens": 2}, within=5
        )
        < 5
    )


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(one_slot: Any) -> None:
    """A non-streaming client that gives up (its own timeout) frees the slot as well."""
    url = one_slot.url + "/v1/completions"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "A long tale", "max_tokens": 2000}, timeout=1.0)
    assert _first_200_after(url, {"prompt": "x", "max_tokens": 2}, within=5) < 5


def test_a_burst_of_requests_is_prefilled_together(module_appliance: Any) -> None:
    """Eight clients sending at the same moment to an engine that has not just finished
    anything: the requests reach the front over a few loop turns and are handed over one after
    another, and the engine, waiting for those on their way (engine/arrivals.py) and a moment
    after each arrival (SETTLE_S), prefills them together instead of starting on the first alone."""
    import json
    import socket
    from urllib.parse import urlsplit

    from appliance.engine.join import RETURN_S
    from benchmarks.costs import batch_joins

    base = module_appliance.url
    where = urlsplit(base)

    def _joins(url: str) -> tuple[int, int]:
        got = batch_joins(url)
        assert got is not None
        return got

    def burst(first: int) -> tuple[list[bytes], float, float]:
        socks = [
            socket.create_connection((where.hostname, where.port), timeout=60) for _ in range(8)
        ]
        try:
            # Ends older than RETURN_S hold nobody: only the front's count can keep them together.
            time.sleep(RETURN_S + 0.1)
            joins0, joined0 = _joins(base)
            for i, s in enumerate(socks):  # the eight requests leave within microseconds
                body = json.dumps(_chat_body(first + i, 8)).encode()
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: "
                    + where.netloc.encode()
                    + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + b"Content-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            answers = []
            for s in socks:
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                answers.append(data.split(b"\r\n", 1)[0])
        finally:
            for s in socks:
                s.close()
        joins1, joined1 = _joins(base)
        return answers, joins1 - joins0, joined1 - joined0

    rounds = []
    for r in range(3):
        answers, joins, joined = burst(100 * r)
        assert answers == [b"HTTP/1.1 200 OK"] * 8 and joined == 8, answers
        rounds.append(joins)
    # One join a burst (without the count: two each time), at most one burst split.
    assert sum(rounds) <= 4 and max(rounds) <= 2, rounds


def test_a_long_prompt_being_tokenized_does_not_hold_other_requests(
    module_appliance: Any,
) -> None:
    """An agent's turn resends its whole conversation, and rendering and tokenizing it takes a
    core for a while (about 0.9 s here for 700k tokens of the demo model's). Meanwhile the
    server goes on answering: the front prepares prompts on a thread of its own, not on the
    event loop that serves every other request and stream. The long prompt is then refused for
    the model's context, naming the messages."""
    text = "".join(f"w{i % 97} " for i in range(240_000))
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def long_request() -> None:
        try:
            with httpx.Client(timeout=60) as c:
                t0 = time.perf_counter()
                r = c.post(
                    module_appliance.url + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": text}], "max_tokens": 1},
                )
                took = time.perf_counter() - t0
                outcome.update(status=r.status_code, body=r.json(), took=took)
        finally:
            done.set()

    waits = []
    with httpx.Client(timeout=60) as c:
        c.get(module_appliance.url + "/healthz")  # the connection made
        sender = threading.Thread(target=long_request)
        sender.start()
        while not done.is_set():
            t0 = time.perf_counter()
            assert c.get(module_appliance.url + "/healthz").status_code == 200
            waits.append(time.perf_counter() - t0)
        sender.join()
    assert outcome["status"] == 400, outcome["body"]
    assert outcome["body"]["error"]["param"] == "messages"
    assert outcome["took"] > 0.3  # long enough for the check to mean something
    assert len(waits) > 3 and max(waits) < outcome["took"] / 3, (max(waits), outcome["took"])
