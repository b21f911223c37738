"""The runtime state file and crash-loop detection. No Falcon, no MLX here.

One JSON file (`state.path`, default `<platform state folder>/appliance/state.json`) records the
models loaded, whether the last run shut down cleanly and the recent start times. It is written
atomically (a temp file in the same folder, fsync, os.replace) under a `filelock` lock. The
appliance never fails because of this file: a corrupted, empty or unreadable one is logged and
moved aside (`state.json.corrupt-<time>`), an unwritable location is logged, and either way the
server runs with a fresh state.

Crash loop: a start that follows an unclean exit is an unclean start. The unclean starts in a
row (each run before them ended without a clean shutdown and before it ran `stable_after_s`
outside safe mode), within `crash_loop.window_s`, are counted; `crash_loop.starts` of them put
the appliance in safe mode. A model that takes minutes to load and crashes the process each time
is caught as surely as a fast crash, since the window (an hour by default) holds several loads.
A run that lasts `stable_after_s` in normal running clears the history.

The file also keeps lifetime counters (`lifetime.process_starts`, `lifetime.unclean_starts`),
exported as `lmx_process_starts_total` and `lmx_unclean_starts_total`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import filelock
import platformdirs

from .config import StateConfig

log = logging.getLogger("appliance.state")

VERSION = 1
LOCK_TIMEOUT_S = 5.0


def default_path() -> Path:
    """`~/Library/Application Support/appliance/state.json` on macOS, XDG_STATE_HOME on Linux."""
    return platformdirs.user_state_path("appliance") / "state.json"


def state_path(cfg: StateConfig) -> Path:
    return Path(cfg.path).expanduser() if cfg.path else default_path()


@dataclass(frozen=True)
class Boot:
    """What the state file says about this start."""

    previous_clean: bool  # True also on a first start (no state file)
    recover: tuple[str, ...]  # models loaded when the previous run ended uncleanly
    crash_streak: int  # unclean starts in a row, this one included, within the window
    safe_mode_reason: Optional[str]
    started_at: float
    first_crash_at: Optional[float] = None  # the start of the first crashed run of the streak
    # Models an admin loaded by path, by name: their settings, and whether each was loaded when
    # the previous run ended (they come back after a clean restart too).
    runtime: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime_loaded: tuple[str, ...] = ()


class _Corrupt(ValueError):
    pass


def _validate(data: Any) -> dict[str, Any]:
    """The parsed file if it has the expected shape; _Corrupt naming the first problem."""
    if not isinstance(data, dict):
        raise _Corrupt("the top level is not a JSON object")
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise _Corrupt("'models' is not a list of names")
    if not isinstance(data.get("clean_shutdown", True), bool):
        raise _Corrupt("'clean_shutdown' is not a boolean")
    starts = data.get("starts", [])
    if not isinstance(starts, list):
        raise _Corrupt("'starts' is not a list")
    for s in starts:
        if not isinstance(s, dict) or not isinstance(s.get("at"), (int, float)):
            raise _Corrupt("an entry of 'starts' has no numeric 'at'")
    lifetime = data.get("lifetime", {})
    if not isinstance(lifetime, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in lifetime.values()
    ):
        raise _Corrupt("'lifetime' is not a map of counts")
    runtime = data.get("runtime", {})
    if not isinstance(runtime, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in runtime.items()
    ):
        raise _Corrupt("'runtime' is not a map of model settings")
    return data


class StateStore:
    """The state file of one appliance process; every method is safe to call and never raises."""

    def __init__(self, cfg: StateConfig, path: Optional[Path] = None) -> None:
        self.cfg = cfg
        self.path = path or state_path(cfg)
        self.data: dict[str, Any] = {}
        self.writable = True
        self.problem: Optional[str] = None  # the last thing that went wrong, for /admin/health
        self.boot: Optional[Boot] = None
        self.pending: list[str] = []  # models to recover that have not loaded (or failed) yet
        self.recovered: list[str] = []
        self.recovery_failed: dict[str, str] = {}
        self.dead: list[str] = []  # models whose generation thread died, until they load again
        self.stable = False
        self._loaded: Callable[[], list[str]] = list
        self._runtime: Callable[[], dict[str, dict[str, Any]]] = dict
        self._mutex = threading.RLock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._logged: set[str] = set()
        self._closed = False

    # -- reading
    def _lock(self) -> filelock.BaseFileLock:
        return filelock.FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)

    def _trouble(self, message: str, *, level: int = logging.WARNING) -> None:
        """Log a problem once (the same one again goes to debug) and remember it for health."""
        self.problem = message
        if message in self._logged:
            log.debug("state file: %s", message)
            return
        self._logged.add(message)
        log.log(level, "state file: %s", message)

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            self._trouble(f"{self.path} {why} and could not be moved aside ({exc}); starting fresh")
            return
        self._trouble(f"{self.path} {why}; moved it to {target.name} and starting fresh")

    def read(self) -> dict[str, Any]:
        """The file's content, or {} when it is missing, empty, corrupted or unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            self._trouble(f"{self.path} is a directory, not a state file; starting fresh")
            self.writable = False
            return {}
        except OSError as exc:
            self._move_aside(f"could not be read ({exc.strerror or exc})")
            return {}
        if not raw.strip():
            self._move_aside("is empty")
            return {}
        try:
            return _validate(json.loads(raw))
        except (ValueError, _Corrupt) as exc:  # JSONDecodeError and UnicodeDecodeError included
            self._move_aside(f"is corrupted ({exc})")
            return {}

    # -- writing
    def _write_now(self) -> bool:
        """Write `self.data` atomically under the file lock; False (logged) when it can't."""
        with self._mutex:
            payload = dict(self.data, version=VERSION, updated_at=time.time())
            text = json.dumps(payload, indent=2, sort_keys=True)
            folder = self.path.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with self._lock():
                    fd, tmp = tempfile.mkstemp(
                        prefix=f".{self.path.name}.", suffix=".tmp", dir=folder
                    )
                    try:
                        with os.fdopen(fd, "w", encoding="utf-8") as f:
                            f.write(text)
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(tmp, self.path)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                    _fsync_dir(folder)
            except (OSError, filelock.Timeout) as exc:
                self.writable = False
                self._trouble(
                    f"cannot write {self.path} ({exc}); running without a persistent state",
                    level=logging.ERROR,
                )
                return False
            if not self.writable:
                log.info("state file %s is writable again", self.path)
            self.writable = True
            return True

    def save(self, models: Optional[list[str]] = None) -> bool:
        """Write the current state now (blocking). Off the event loop, pass `models` taken on
        it (`current_models()`), since the registry belongs to the loop."""
        with self._mutex:
            self.data["models"] = self._models() if models is None else models
            self._record_runtime()
        return self._write_now()

    def current_models(self) -> list[str]:
        """The models to record: loaded ones, and ones still to recover or reload."""
        with self._mutex:
            return self._models()

    def save_soon(self) -> None:
        """Write in the store's own thread, in order, without blocking the caller."""
        if self._closed:
            return
        with self._mutex:
            self.data["models"] = self._models()
            self._record_runtime()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
            self._executor.submit(self._write_now)

    def _record_runtime(self) -> None:
        try:
            self.data["runtime"] = self._runtime()
        except Exception:  # the registry may be closing: keep what was recorded
            pass

    def _models(self) -> list[str]:
        try:
            loaded = list(self._loaded())
        except Exception:  # the registry may be closing
            loaded = list(self.data.get("models", []))
        return loaded + [m for m in [*self.pending, *self.dead] if m not in loaded]

    # -- the run's life
    def begin_run(self, catalog: Iterable[str], now: Optional[float] = None) -> Boot:
        """Read the previous run's state, record this start, and decide recovery and safe mode."""
        now = time.time() if now is None else now
        window = self.cfg.crash_loop.window_s
        try:
            with self._lock():
                prev = self.read()
        except (OSError, filelock.Timeout) as exc:
            self._trouble(f"cannot lock {self.path} ({exc}); starting fresh", level=logging.ERROR)
            prev = {}
        previous_clean = bool(prev.get("clean_shutdown", True))
        starts = [dict(s) for s in prev.get("starts", []) if now - float(s["at"]) <= window]
        if starts and not previous_clean:
            starts[-1]["clean"] = False
        # The runs that crashed in a row, newest first, back to one that ended cleanly or ran
        # stable: each made the start after it an unclean one.
        crashed = []
        if not previous_clean:
            for s in reversed(starts):
                if s.get("clean") or s.get("stable"):
                    break
                crashed.append(s)
        streak = len(crashed)
        first_crash = float(crashed[-1]["at"]) if crashed else None
        reason = None
        if streak >= self.cfg.crash_loop.starts:
            reason = (
                f"crash loop: {streak} unclean starts in a row, each after a run that ended "
                f"without a clean shutdown before {self.cfg.stable_after_s:g} s of stable "
                f"running (state.crash_loop.starts={self.cfg.crash_loop.starts}, within "
                f"window_s={window:g})"
            )
        names = set(catalog)
        recover: tuple[str, ...] = ()
        if not previous_clean and reason is None:
            recover = tuple(m for m in prev.get("models", []) if m in names)
        runtime = {k: dict(v) for k, v in (prev.get("runtime") or {}).items() if k not in names}
        runtime_loaded = tuple(m for m in prev.get("models", []) if m in runtime)
        lifetime = dict(prev.get("lifetime") or {})
        lifetime["process_starts"] = int(lifetime.get("process_starts", 0)) + 1
        lifetime["unclean_starts"] = int(lifetime.get("unclean_starts", 0)) + (
            0 if previous_clean else 1
        )
        with self._mutex:
            self.data = {
                "clean_shutdown": False,
                "pid": os.getpid(),
                "models": list(recover) + list(runtime_loaded),
                "runtime": runtime,
                "started_at": now,
                "safe_mode_reason": reason,
                "lifetime": lifetime,
                "starts": [
                    *starts,
                    {
                        "at": now,
                        "clean": False,
                        "after_unclean": not previous_clean,
                        "safe_mode": reason is not None,
                    },
                ],
            }
            self.pending = list(recover)
        self.boot = Boot(
            previous_clean, recover, streak, reason, now, first_crash, runtime, runtime_loaded
        )
        self._write_now()
        if not previous_clean:
            log.warning(
                "the previous run did not shut down cleanly (%d unclean start(s) in a row "
                "within %g s; safe mode at %d)",
                streak,
                window,
                self.cfg.crash_loop.starts,
            )
        if reason:
            log.error("safe mode: %s", reason)
        elif recover:
            log.warning(
                "recovering models loaded before the unclean shutdown: %s", ", ".join(recover)
            )
        return self.boot

    def lifetime(self) -> dict[str, int]:
        """Process starts and unclean starts over the state file's life."""
        with self._mutex:
            counts = dict(self.data.get("lifetime") or {})
        return {
            "process_starts": int(counts.get("process_starts", 0)),
            "unclean_starts": int(counts.get("unclean_starts", 0)),
        }

    def safe_mode_ended(self, how: str) -> None:
        """Record that safe mode ended in this run ("admin" or "stable"); blocking."""
        with self._mutex:
            self.data["safe_mode_reason"] = None
            starts = self.data.get("starts") or []
            if starts:
                starts[-1]["safe_mode_exit"] = {"at": time.time(), "by": how}
        self._write_now()

    def attach(
        self,
        subscribe: Callable[[Callable[[str, str, dict[str, Any]], None]], None],
        loaded: Callable[[], list[str]],
        runtime: Callable[[], dict[str, dict[str, Any]]] = dict,
    ) -> None:
        """Follow the model registry: write the file on every load, unload and death.
        `runtime`: the settings of the models an admin loaded by path, by name."""
        self._loaded = loaded
        self._runtime = runtime
        subscribe(self.on_model)

    def on_model(self, event: str, name: str, details: dict[str, Any]) -> None:
        """A registry event (on the event loop): track recovery, then write the file soon."""
        if event not in ("loaded", "load_failed", "died", "unloaded", "removed"):
            return
        with self._mutex:  # the writer thread reads these lists
            if event == "loaded":
                if name in self.dead:
                    self.dead.remove(name)
                if name in self.pending:
                    self.pending.remove(name)
                    self.recovered.append(name)
                    log.info("recovered model %s after the unclean shutdown", name)
            elif event == "load_failed" and name in self.pending:
                self.pending.remove(name)
                err = str(details.get("error", "load failed"))
                self.recovery_failed[name] = err
                log.warning("could not recover model %s: %s", name, err)
            elif event == "died" and name not in self.dead:
                self.dead.append(name)  # loaded until it died: reload it after a crash too
        self.save_soon()

    def mark_stable(self) -> None:
        """The run has lasted `stable_after_s` in normal running: clear the start history
        (blocking)."""
        with self._mutex:
            self.stable = True
            starts = self.data.get("starts") or []
            self.data["starts"] = [dict(starts[-1], stable=True)] if starts else []
        self._write_now()  # before saying so: a kill right after the line must find it on disk
        log.info("stable for %g s: start history cleared", self.cfg.stable_after_s)

    def mark_clean(self) -> None:
        """The run is ending cleanly: record it (blocking; the last write)."""
        with self._mutex:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._mutex:
            self.data["clean_shutdown"] = True
            self.data["stopped_at"] = time.time()
            starts = self.data.get("starts") or []
            if starts:
                starts[-1]["clean"] = True
        if self._write_now():
            log.info("state written: clean shutdown")

    def health(self) -> dict[str, Any]:
        """The state file, recovery and crash-loop facts for /admin/health."""
        b = self.boot
        return {
            "path": str(self.path),
            "writable": self.writable,
            "problem": self.problem,
            "previous_clean": None if b is None else b.previous_clean,
            "crash_streak": None if b is None else b.crash_streak,
            "crash_loop_at": self.cfg.crash_loop.starts,
            "stable": self.stable,
            "lifetime": self.lifetime(),
            "recovery": {
                "requested": [] if b is None else list(b.recover),
                "recovered": list(self.recovered),
                "failed": dict(self.recovery_failed),
                "pending": list(self.pending),
            },
        }


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk; not every OS allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
