"""JSON-lines logging to stderr and a rotating file in the platform's log folder."""

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


_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, request_id and any `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def default_log_file() -> Path:
    """~/Library/Logs/appliance on macOS, the XDG state folder on Linux."""
    return platformdirs.user_log_path("appliance") / "appliance.log"


def log_file(cfg: LoggingConfig) -> Optional[Path]:
    if cfg.file is None:
        return default_log_file()
    if cfg.file.strip().lower() in ("", "none", "off"):
        return None
    return Path(cfg.file).expanduser()


def setup(cfg: LoggingConfig) -> Optional[Path]:
    """Configure the root logger; returns the log file in use (None for stderr only)."""
    fmt: logging.Formatter = (
        JsonFormatter()
        if cfg.format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_appliance", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = log_file(cfg)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    path, maxBytes=cfg.rotation.max_bytes, backupCount=cfg.rotation.backups
                )
            )
        except OSError as exc:
            print(f"cannot open log file {path}: {exc}; logging to stderr only", file=sys.stderr)
            path = None
    for h in handlers:
        h.setFormatter(fmt)
        h._appliance = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(cfg.level.upper())
    # uvicorn's access log duplicates ours; its error log goes through the same handlers.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    return path
