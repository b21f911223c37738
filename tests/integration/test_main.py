"""The app's probes through falcon.testing, and a real `python -m appliance` start and stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from falcon.testing import ASGIConductor

from appliance.builder import build
from appliance.config import compose, load

from ..conftest import with_demo

pytestmark = pytest.mark.timeout(90)

# The host guard admits only loopback names while the server is bound to loopback.
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until_ready(conductor: ASGIConductor, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        status = (await conductor.simulate_get("/readyz", host=HOST)).status_code
        if status == 200 or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


def test_probes_without_a_model(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    appliance = build(load(compose(["models.auto_load=[]", "logging.file=none"])))

    async def scenario() -> None:
        async with ASGIConductor(appliance.app) as conductor:
            health = await conductor.simulate_get("/healthz", host=HOST)
            assert health.status_code == 200
            ready = await conductor.simulate_get("/readyz", host=HOST)
            assert ready.status_code == 503
            assert ready.headers.get("Retry-After")
            err = ready.json["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] == "not_ready"
            # Loading the model (what the admin API does) makes the appliance ready.
            await appliance.engine.registry.load("demo")
            ready = await conductor.simulate_get("/readyz", host=HOST)
            assert ready.status_code == 200
            assert ready.json["models"] == ["demo"]

    asyncio.run(scenario())


def test_readyz_turns_200_once_auto_load_is_done(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    appliance = build(load(compose(with_demo(["logging.file=none"]))))

    async def scenario() -> None:
        async with ASGIConductor(appliance.app) as conductor:
            assert (await conductor.simulate_get("/healthz", host=HOST)).status_code == 200
            assert await _until_ready(conductor) == 200
            missing = await conductor.simulate_get("/no/such/route", host=HOST)
            assert missing.status_code == 404
            assert missing.json["error"]["code"] == "not_found"

    asyncio.run(scenario())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_real_start_and_clean_stop(demo_cache: Path, tmp_path: Path, sig: int) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    state = tmp_path / "state"
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(demo_cache), "XDG_STATE_HOME": str(state)}
    for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        env.pop(key, None)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", f"server.port={port}"],
            cwd=cwd,
            env=env,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
                    if status == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            assert status == 200, err_path.read_text()
            proc.send_signal(sig)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    output = err_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output
    # Nothing left in the working directory: no outputs/ folder (Hydra), no log file.
    assert list(cwd.iterdir()) == []
    # The log went to the platform's log folder (XDG state on Linux), as JSON lines.
    log_file = state / "appliance" / "log" / "appliance.log"
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert lines and all({"time", "level", "event"} <= set(rec) for rec in lines)
    assert not any("color_message" in rec for rec in lines)
    # stderr is not a terminal (as under launchd or systemd): the lines went to the file only,
    # and stderr says where, once.
    assert output.strip().splitlines() == [f"logging to {log_file}"], output
    # The port is free again: the process really stopped serving.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_on_a_terminal_lines_go_to_the_console_too(demo_cache: Path, tmp_path: Path) -> None:
    """Run under a pseudo-terminal (an operator's shell): readable coloured lines on the console,
    JSON lines in the file, the same events in both."""
    import pty
    import select

    port = free_port()
    log_file = tmp_path / "appliance.log"
    env = {**os.environ, "XDG_CACHE_HOME": str(demo_cache), "XDG_STATE_HOME": str(tmp_path)}
    for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        env.pop(key, None)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", f"server.port={port}", f"logging.file={log_file}"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    console = b""
    try:
        deadline = time.monotonic() + 60
        while b"Application startup complete" not in console and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    console += os.read(master, 65536)
                except OSError:  # the process is gone: the pty closed
                    break
        assert b"Application startup complete" in console, console.decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    text = console.decode(errors="replace")
    assert "\x1b[" in text  # coloured
    assert not any(line.lstrip().startswith("{") for line in text.splitlines())
    assert "logging to" not in text  # a terminal sees the lines themselves
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert "Application startup complete." in events
