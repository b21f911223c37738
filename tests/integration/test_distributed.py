"""Two ranks on 127.0.0.1 with MLX's ring backend on the CPU, on the demo model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from ..conftest import Appliance, free_port, with_demo

pytestmark = pytest.mark.timeout(180)

ADMIN = "group-admin-key"
PROMPTS = ["hello there", "the weather today", "a short story about servers", "bread"]


class Group:
    """`python -m appliance.launch` with two local ranks."""

    def __init__(self, home: Path, demo_cache: Path, *overrides: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "launch.log"
        env = {
            **os.environ,
            "XDG_CACHE_HOME": str(demo_cache),
            "XDG_STATE_HOME": str(home / "state"),
        }
        env.pop("LMX_API_KEYS", None)
        env["LMX_ADMIN_KEY"] = ADMIN
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.launch",
                "distributed.hosts=[127.0.0.1,127.0.0.1]",
                f"server.port={self.port}",
                "logging.file=none",
                *with_demo(list(overrides)),
            ],
            cwd=home,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ranks(self) -> dict[int, psutil.Process]:
        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("APPLIANCE_RANK")
            except psutil.Error:
                continue
            if rank is not None:
                out[int(rank)] = child
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for p in self.ranks().values():
                    p.kill()
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _chat(url: str, prompt: str, stream: bool = False) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])
    import json

    from httpx_sse import connect_sse

    parts = []
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(client, "POST", url + "/v1/chat/completions", json=body) as source,
    ):
        for event in source.iter_sse():
            if event.data == "[DONE]":
                break
            chunk = json.loads(event.data)
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                parts.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path) -> Iterator[Appliance]:
    a = Appliance(tmp_path_factory.mktemp("single"), demo_cache, ("logging.file=none",)).start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path) -> Iterator[Group]:
    g = Group(tmp_path_factory.mktemp("group"), demo_cache)
    yield g
    g.stop()


def test_two_ranks_give_the_single_process_output(single: Appliance, group: Group) -> None:
    assert sorted(group.ranks()) == [0, 1], group.log()
    for prompt in PROMPTS[:2]:
        want = _chat(single.url, prompt)
        assert want
        assert _chat(group.url, prompt) == want
        assert _chat(group.url, prompt, stream=True) == want


def test_concurrent_requests_batch_across_ranks(single: Appliance, group: Group) -> None:
    want = {p: _chat(single.url, p) for p in PROMPTS}
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        got = list(pool.map(lambda p: (p, _chat(group.url, p)), PROMPTS * 2))
    for prompt, text in got:
        assert text == want[prompt]


def test_health_and_metrics_show_the_group(group: Group) -> None:
    r = httpx.get(
        group.url + "/admin/health", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    dist = r.json()["distributed"]
    assert dist["size"] == 2 and dist["backend"] == "ring" and dist["ranks_healthy"] == 2
    text = httpx.get(group.url + "/metrics", timeout=10).text
    assert "lmx_distributed_group_size 2.0" in text
    assert "lmx_distributed_ranks_healthy 2.0" in text


def test_sigterm_on_rank0_stops_every_rank(tmp_path: Path, demo_cache: Path) -> None:
    g = Group(tmp_path / "g", demo_cache)
    ranks = g.ranks()
    assert sorted(ranks) == [0, 1]
    ranks[0].send_signal(signal.SIGTERM)
    assert g.proc.wait(30) == 0, g.log()
    for p in ranks.values():
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    g.stop()


def test_killing_rank1_makes_rank0_unready_and_exit_nonzero(
    tmp_path: Path, demo_cache: Path
) -> None:
    g = Group(tmp_path / "g", demo_cache)
    ranks = g.ranks()
    rank0 = ranks[0]
    t0 = time.monotonic()
    ranks[1].kill()
    saw_503 = False
    while (
        rank0.is_running() and rank0.status() != psutil.STATUS_ZOMBIE and time.monotonic() - t0 < 20
    ):
        try:
            saw_503 |= httpx.get(g.url + "/readyz", timeout=1).status_code == 503
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    code = g.proc.wait(20)
    elapsed = time.monotonic() - t0
    assert code != 0, g.log()
    assert elapsed < 20
    assert saw_503, "rank 0 never reported not ready before exiting"
    assert "rank 1 exited" in g.log()
    g.stop()
