"""Shared fixtures: a demo-model cache built once per session, and real appliance processes.

Every appliance a test starts is a real `python -m appliance` on 127.0.0.1 with a free port,
its own state and log folders, stopped by PID at the end of the test (or module).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SIGTERM = signal.SIGTERM  # the Appliance.signal method shadows the module in its class body


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder: `unit` (no server, no model, seconds) or `integration`."""
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, kind))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Test appliances serve the demo model unless a test says otherwise (the base config's default,
# SmolLM2, is for answers; the demo model is for speed).
DEMO = ("models.default=demo", "models.auto_load=[demo]")


def with_demo(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """`overrides`, plus the demo model as default and auto-load where they don't say."""
    said = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    return [*(d for d in DEMO if d.split("=", 1)[0] not in said), *overrides]


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An XDG cache folder holding the demo model, built once for the whole session, and the
    SmolLM2 file (linked from the user's model cache, where `make test` fetched it)."""
    from appliance.engine.builtin import SMOLLM2_FILE, smollm2_dir

    cache = tmp_path_factory.mktemp("xdg-cache")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    subprocess.run(
        [sys.executable, "-m", "appliance.engine.demo"],
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
    )
    real = smollm2_dir() / SMOLLM2_FILE
    if real.is_file():
        target = cache / "appliance" / "models" / "smollm2"
        target.mkdir(parents=True, exist_ok=True)
        (target / SMOLLM2_FILE).symlink_to(real)
    return cache


@pytest.fixture(scope="session")
def demo_model_dir(demo_cache: Path) -> Path:
    """The demo model's folder inside `demo_cache` (what `builtin:demo` resolves to there)."""
    from appliance.engine.demo import demo_dir

    path = demo_dir(demo_cache / "appliance" / "models")
    assert (path / "config.json").is_file(), path
    return path


_ARRANGED: dict[str, str] = {}


def arranged_blas() -> dict[str, str]:
    """LD_PRELOAD and the marker an appliance with engine.cpu_blas=auto gives itself, worked out
    once for the session: test appliances start under them and need not execute themselves
    again (about half a second a start on two cores). A test of that step passes
    `NOT_ARRANGED` in its env."""
    if not _ARRANGED:
        from appliance.engine import cpu

        env = cpu.preload_env("auto", True, dict(os.environ))
        _ARRANGED.update({k: env.get(k, "") for k in (cpu.PRELOAD_ENV, cpu.MARKER_ENV)})
    return dict(_ARRANGED)


NOT_ARRANGED = {"LD_PRELOAD": "", "APPLIANCE_CPU_BLAS": ""}  # the appliance arranges its own


class Appliance:
    """A real appliance process on a free loopback port."""

    def __init__(
        self,
        home: Path,
        demo_cache: Path,
        overrides: tuple[str, ...] = (),
        env: Optional[dict[str, str]] = None,
        port: Optional[int] = None,
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "stderr.log"
        self.overrides = overrides
        self.env = {
            **os.environ,
            **arranged_blas(),
            "XDG_CACHE_HOME": str(demo_cache),
            "XDG_STATE_HOME": str(home / "state"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
            if env is None or key not in env:
                self.env.pop(key, None)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, wait: str = "/readyz", timeout: float = 60.0) -> Appliance:
        home = self.home
        home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                f"server.port={self.port}",
                *with_demo(self.overrides),
            ],
            cwd=home,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_for(wait, timeout)
        return self

    def wait_for(self, path: str, timeout: float = 60.0, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} never answered {status}:\n{self.log()}")

    @property
    def log_file(self) -> Path:
        """The appliance's own log file when `logging.file` is left at its default."""
        return self.home / "state" / "appliance" / "log" / "appliance.log"

    def log(self) -> str:
        """What the process wrote to stderr, then its log file (under a service manager, stderr
        not being a terminal, the lines go to the file only)."""
        out = []
        for path in (self.log_path, self.log_file):
            try:
                out.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "".join(out)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process and wait; kills it if it does not exit in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture
def appliance_factory(tmp_path: Path, demo_cache: Path) -> Iterator[object]:
    """Start appliances with overrides; all are stopped at the end of the test."""
    started: list[Appliance] = []

    def make(
        *overrides: str,
        env: Optional[dict[str, str]] = None,
        wait: str = "/readyz",
        home: Optional[Path] = None,
        port: Optional[int] = None,
    ) -> Appliance:
        a = Appliance(home or tmp_path / f"app{len(started)}", demo_cache, overrides, env, port)
        started.append(a)
        return a.start(wait=wait)

    yield make
    for a in started:
        a.stop()


@pytest.fixture(scope="module")
def module_appliance(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path, request: pytest.FixtureRequest
) -> Iterator[Appliance]:
    """One appliance shared by a module; its overrides come from `APPLIANCE_OVERRIDES` and
    `APPLIANCE_ENV` in the module, if set."""
    overrides = tuple(getattr(request.module, "APPLIANCE_OVERRIDES", ()))
    env = getattr(request.module, "APPLIANCE_ENV", None)
    home = tmp_path_factory.mktemp("module-appliance")
    a = Appliance(home, demo_cache, overrides, env)
    try:
        a.start()
        yield a
    finally:
        a.stop()  # also when it never got ready: no process is left behind


@pytest.fixture(scope="module")
def module_appliance_factory(
    tmp_path_factory: pytest.TempPathFactory, demo_cache: Path
) -> Iterator[object]:
    """Start appliances that live for the whole module (for a module that needs several
    configurations); all are stopped at the end of the module."""
    started: list[Appliance] = []

    def make(
        *overrides: str, env: Optional[dict[str, str]] = None, wait: str = "/readyz"
    ) -> Appliance:
        a = Appliance(tmp_path_factory.mktemp("module-app"), demo_cache, overrides, env)
        started.append(a)
        return a.start(wait=wait)

    yield make
    for a in started:
        a.stop()
