"""recipes/loadbalancer/nginx.conf in front of two real appliances: draining one loses nothing."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from ..conftest import ROOT, free_port

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("nginx") is None, reason="nginx is not installed (Debian: nginx-light)"
    ),
]


def render(upstreams: list[int], port: int, prefix: Path) -> Path:
    """The shipped recipe with this test's ports, pid file and temp folders."""
    conf = (ROOT / "recipes" / "loadbalancer" / "nginx.conf").read_text()
    servers = "".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;\n" for p in upstreams
    )
    conf, n = re.subn(r"(        server 10\.0\.0\.\d+:8080[^\n]*\n)+", servers, conf)
    assert n == 1
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("pid /run/appliance-lb.pid;", f"pid {prefix}/nginx.pid;")
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    temps = "".join(
        f"    {name}_temp_path {prefix}/{name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("    access_log off;\n", "    access_log off;\n" + temps)
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path


def test_a_drained_appliance_leaves_rotation_and_no_request_fails(
    appliance_factory,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    a = appliance_factory("logging.file=none", "server.drain_timeout_s=10")
    b = appliance_factory("logging.file=none")
    port = free_port()
    conf = render([a.port, b.port], port, tmp_path)
    check = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True
    )
    assert check.returncode == 0, check.stderr.decode()
    nginx = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set() and len(statuses) < 400:
                    r = client.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3})
                    statuses.append(r.status_code)

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        while len(statuses) < 20:
            time.sleep(0.05)
        a.signal(signal.SIGTERM)
        assert a.proc.wait(20) == 0, a.log()
        before = len(statuses)
        while len(statuses) < before + 30:
            time.sleep(0.05)
        stop.set()
        for w in workers:
            w.join(30)
        assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
        assert "drain" in a.log()
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
