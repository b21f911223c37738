"""Logging to a rotating file in the platform's log folder and, on a terminal, to the console.

Under a service manager (stderr not a terminal) a line goes to the file only; with no file, to
stderr. `logging.format`: json, console, or auto (console on a terminal, JSON elsewhere).
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import orjson
import platformdirs

from .config import LoggingConfig

request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "request_id", default=None
)

_ids = random.Random()  # its own generator: no library's random.seed() makes ids repeat
os.register_at_fork(after_in_child=_ids.seed)


def new_id() -> str:
    """32 random hex digits, for request and completion ids. From Python's generator, not
    uuid4's os.urandom: that system call gives up the GIL, and on a busy server the event loop
    then waited 0.4-0.5 ms to get it back (a 2-core x86 CPU, engine in a thread or a process).
    The ids are not secrets (headers and bodies echo them, and clients may choose their own)."""
    return f"{_ids.getrandbits(128):032x}"


# LogRecord's own attributes, and uvicorn's `color_message` (the same text with ANSI escapes).
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra` fields, in the order they were given."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


def _iso(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, request_id and any `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso(record),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        out.update(_extras(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


_COLOURS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class ConsoleFormatter(logging.Formatter):
    """A line for people: local time, level, logger, event, then `key=value` extras; the level
    coloured when `colour` (a terminal)."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        stamp += f".{int(record.msecs):03d}"
        level = record.levelname
        extras = _extras(record)
        rid = request_id.get()
        if rid is not None and "request_id" not in extras:
            extras["request_id"] = rid
        tail = " ".join(f"{k}={v}" for k, v in extras.items() if v is not None)
        if self.colour:
            head = f"{_DIM}{stamp}{_RESET} {_COLOURS.get(level, '')}{level:<7}{_RESET}"
            line = f"{head} {_DIM}{record.name}{_RESET} {record.getMessage()}"
            if tail:
                line += f" {_DIM}{tail}{_RESET}"
        else:
            line = f"{stamp} {level:<7} {record.name} {record.getMessage()}"
            if tail:
                line += f" {tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def default_log_file() -> Path:
    """~/Library/Logs/appliance on macOS, the XDG state folder on Linux."""
    return platformdirs.user_log_path("appliance") / "appliance.log"


def log_file(cfg: LoggingConfig) -> Optional[Path]:
    if cfg.file is None:
        return default_log_file()
    if cfg.file.strip().lower() in ("", "none", "off"):
        return None
    return Path(cfg.file).expanduser()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def formatter(fmt: str, terminal: bool) -> logging.Formatter:
    """The formatter of one destination: `json`, `console` (`text`), or `auto` (console on a
    terminal, JSON to files and pipes)."""
    if fmt == "json" or (fmt == "auto" and not terminal):
        return JsonFormatter()
    return ConsoleFormatter(colour=terminal)


def setup(cfg: LoggingConfig, terminal: Optional[bool] = None) -> Optional[Path]:
    """Configure the root logger; returns the log file in use (None for stderr only).

    With a log file and stderr not a terminal (launchd, systemd), lines go to the file only:
    the supervisor's own stderr file would otherwise grow with every line, unrotated. On a
    terminal they go to both. `terminal` overrides the detection (tests)."""
    tty = _stderr_is_terminal() if terminal is None else terminal
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_appliance", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = []
    path = log_file(cfg)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=cfg.rotation.max_bytes, backupCount=cfg.rotation.backups
            )
            handler.setFormatter(formatter(cfg.format, terminal=False))
            handlers.append(handler)
        except OSError as exc:
            print(f"cannot open log file {path}: {exc}; logging to stderr only", file=sys.stderr)
            path = None
    if path is None or tty:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter(cfg.format, terminal=tty))
        handlers.append(console)
    for h in handlers:
        h._appliance = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(cfg.level.upper())
    # uvicorn's access log duplicates ours; its error log goes through the same handlers.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    if path is not None and not tty:
        # Said once on stderr, so the supervisor's file tells where the log went.
        print(f"logging to {path}", file=sys.stderr, flush=True)
    return path
