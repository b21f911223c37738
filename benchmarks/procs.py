"""The bench's subprocesses: started in sessions of their own, stopped by PID, measured."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import httpx

from benchmarks.common import say


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM if the bench dies without cleaning up (SIGKILL, OOM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def preexec() -> Optional[Callable[[], None]]:
    """The preexec_fn for a child: die_with_parent on Linux, nothing elsewhere."""
    return die_with_parent if sys.platform.startswith("linux") else None


class Proc:
    """One subprocess of the bench, stopped by PID."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path
    ) -> None:
        self.name, self.argv, self.env, self.cwd, self.log_path = name, argv, env, cwd, log_path
        self.popen: Optional[subprocess.Popen[bytes]] = None
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec(),
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        return p.returncode

    def cpu_seconds(self) -> Optional[float]:
        """User + system CPU seconds of the process and its children so far."""
        if not self.alive():
            return None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            t = proc.cpu_times()
            total = float(t.user + t.system)
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    ct = child.cpu_times()
                    total += float(ct.user + ct.system)
            return total
        except psutil.Error:
            return None

    def rss_bytes(self) -> Optional[int]:
        """RSS of the process and its children."""
        if not self.alive():
            return None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            total = int(proc.memory_info().rss)
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return None


class Procs:
    """Every process the bench started; `stop_all` in a finally block."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            if proc.alive():
                say(f"stopping {proc.name} (pid {proc.pid})")
            proc.stop()
        self.items.clear()


def wait_ready(proc: Proc, url: str, timeout: float, interval: float = 0.01) -> float:
    """Poll url until 200; returns seconds since the process was started."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - proc.started
            except httpx.HTTPError:
                pass
            time.sleep(interval)
    raise TimeoutError(
        f"{proc.name}: {url} never answered 200 in {timeout:.0f} s:\n{proc.log_tail()}"
    )
