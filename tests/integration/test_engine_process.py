"""A model in an engine process of its own (`models.catalog.NAME.engine_process: true`): the
same answers as the in-process generation thread, over the real server, with the child's
life tied to the server's (killed engine -> reload, stopped server -> no orphan)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI

from ._resilience import ADMIN_ENV, BASE, Stream, admin_post, metric, wait_until

pytestmark = pytest.mark.timeout(120)

OWN = "++models.catalog.demo.engine_process=true"
THREAD = "++models.catalog.demo.engine_process=false"


def engines(server_pid: int) -> list[psutil.Process]:
    """The server's engine processes."""
    out = []
    for child in psutil.Process(server_pid).children():
        try:
            if "appliance.engine.process" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def pair(module_appliance_factory: Any) -> tuple[Any, Any]:
    own = module_appliance_factory(
        *BASE,
        OWN,
        "limits.engine_restart_backoff_s=0.2",
        env={**ADMIN_ENV, "APPLIANCE_FAULT_INJECTION": "1"},
    )
    thread = module_appliance_factory(*BASE, THREAD)
    return own, thread


def test_the_model_runs_in_a_child_process_and_answers_as_in_process(pair: tuple[Any, Any]) -> None:
    own, thread = pair
    assert own.proc is not None and thread.proc is not None
    (engine,) = engines(own.proc.pid)
    assert engines(thread.proc.pid) == []
    # The engine inherits the server's MLX settings (see appliance/engine/mlx_ext/cuda.py).
    assert engine.environ().get("MLX_ENABLE_CACHE_THRASHING_CHECK") == "0"
    assert engine.environ().get("MLX_USE_CUDA_GRAPHS") == "0"
    prompts = ["Tell me about the valley", "A story about a fox", "Why is the sky blue?"]
    for prompt in prompts:
        answers = []
        for a in (own, thread):
            client = OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0, timeout=30)
            r = client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=24,
                logprobs=True,
                top_logprobs=2,
            )
            assert r.usage is not None and r.usage.completion_tokens == 24
            assert r.choices[0].logprobs is not None
            lps = [(t.token, round(t.logprob, 3)) for t in r.choices[0].logprobs.content or []]
            answers.append((r.choices[0].message.content, lps))
        assert answers[0] == answers[1], prompt
    # Streaming with usage, and a prompt prefix the engine's cache serves the second time.
    client = OpenAI(base_url=own.url + "/v1", api_key="x", max_retries=0, timeout=30)
    for _ in range(2):
        stream = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": prompts[0] + " again, longer"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens
    # What the engine reports reaches /metrics: MLX memory (the weights live in the child)
    # and the batch counters.
    wait_until(
        lambda: (metric(own.url, "lmx_memory_bytes", kind="mlx_active") or 0) > 1_000_000,
        timeout=10,
        what="the engine's MLX memory in /metrics",
    )
    wait_until(
        lambda: (metric(own.url, "lmx_batch_joins_total", model="demo") or 0) > 0,
        timeout=10,
        what="the engine's batch counters in /metrics",
    )
    assert engines(own.proc.pid) == [engine]


def test_embeddings_and_bad_input_cross_the_process_boundary(pair: tuple[Any, Any]) -> None:
    own, thread = pair
    vecs = []
    for a in (own, thread):
        r = httpx.post(
            a.url + "/v1/embeddings",
            json={"model": "demo", "input": ["a fox", "a dog"]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        vecs.append([d["embedding"] for d in r.json()["data"]])
    assert vecs[0] == vecs[1]
    # An error raised in the engine process comes back as the same OpenAI error.
    r = httpx.post(
        own.url + "/v1/embeddings", json={"model": "demo", "input": "word " * 5000}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"


def test_a_client_that_leaves_frees_its_place_in_the_engine(pair: tuple[Any, Any]) -> None:
    own, _ = pair
    with httpx.Client(base_url=own.url, timeout=30) as client:
        with client.stream(
            "POST",
            "/v1/completions",
            json={"prompt": "A long story", "max_tokens": 1500, "stream": True},
        ) as r:
            lines = r.iter_lines()
            wait_until(lambda: next(lines).startswith("data:"), timeout=30, what="first tokens")
            assert metric(own.url, "lmx_num_requests_running") == 1.0
    wait_until(
        lambda: metric(own.url, "lmx_num_requests_running") == 0.0,
        timeout=10,
        what="the slot freed",
    )
    r = httpx.post(own.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_unload_and_load_end_and_start_the_engine_process(pair: tuple[Any, Any]) -> None:
    own, _ = pair
    (before,) = engines(own.proc.pid)
    admin_post(own.url, "/admin/models/unload", {"model": "demo"})
    before.wait(15)  # the child exited
    assert engines(own.proc.pid) == []
    admin_post(own.url, "/admin/models/load", {"model": "demo"})
    (after,) = engines(own.proc.pid)
    assert after.pid != before.pid
    r = httpx.post(own.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_killed_engine_fails_its_requests_and_the_model_reloads(pair: tuple[Any, Any]) -> None:
    own, _ = pair
    (engine,) = engines(own.proc.pid)
    stream = Stream(own.url, "A long story about the valley", 1500)
    stream.start()
    assert stream.got_tokens.wait(30)
    os.kill(engine.pid, signal.SIGKILL)
    stream.join(30)
    assert stream.done, stream.datas[-3:]
    assert stream.errors and stream.errors[0]["code"] == "engine_failure", stream.datas[-3:]
    assert "engine process" in stream.errors[0]["message"]
    own.wait_for("/readyz", timeout=30)
    (again,) = engines(own.proc.pid)
    assert again.pid != engine.pid
    r = httpx.post(own.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text
    assert "model demo reloaded after its generation thread died" in own.log()


def test_a_model_that_fails_to_load_there_leaves_no_process(
    appliance_factory: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    a = appliance_factory(
        *BASE, OWN, f"+models.catalog.broken={{path:'{broken}',engine_process:true}}"
    )
    r = httpx.post(
        a.url + "/v1/completions",
        json={"model": "broken", "prompt": "hi", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and "broken" in err["message"], err
    wait_until(lambda: len(engines(a.proc.pid)) == 1, timeout=10, what="only demo's engine left")
    ok = httpx.post(a.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_a_generation_thread_that_raises_in_the_engine_is_reported_and_reloaded(
    pair: tuple[Any, Any],
) -> None:
    own, _ = pair
    (engine,) = engines(own.proc.pid)
    stream = Stream(own.url, "A long story about the valley", 1500)
    stream.start()
    assert stream.got_tokens.wait(30)
    r = httpx.post(own.url + "/testing/faults", json={"kill_model": "demo"}, timeout=10)
    assert r.status_code == 200, r.text
    stream.join(30)
    assert stream.errors and stream.errors[0]["code"] == "engine_failure", stream.datas[-3:]
    engine.wait(15)  # the engine process ended with its thread
    own.wait_for("/readyz", timeout=30)
    assert len(engines(own.proc.pid)) == 1
    assert "injected fault" in own.log()  # the engine's own log line, through the server's
    r = httpx.post(own.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_engine_process_never_outlives_the_server(appliance_factory: Any, sig: int) -> None:
    a = appliance_factory(*BASE, OWN)
    (engine,) = engines(a.proc.pid)
    a.signal(sig)
    a.proc.wait(30)
    engine.wait(15)  # raises psutil.TimeoutExpired if the child stayed
    assert not engine.is_running()
