"""Log destinations and formats: a file alone under a service manager, the console too on a
terminal; JSON without uvicorn's colour copy; the access log's API names."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import logs
from appliance.config import LoggingConfig
from appliance.middleware.access_log import api_of


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if getattr(h, "_appliance", False):
            root.removeHandler(h)
            h.close()
    root.handlers[:] = before
    root.setLevel(level)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_appliance", False)]


def test_a_service_logs_to_the_file_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "appliance.log"
    assert logs.setup(LoggingConfig(file=str(path)), terminal=False) == path
    (handler,) = _ours()
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    logging.getLogger("appliance").warning("to the file", extra={"model": "demo"})
    err = capsys.readouterr().err
    assert "to the file" not in err
    assert err.strip() == f"logging to {path}"  # once, so the supervisor's file says where
    rec = json.loads(path.read_text().splitlines()[-1])
    assert (rec["event"], rec["level"], rec["model"]) == ("to the file", "WARNING", "demo")


def test_a_terminal_gets_the_console_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "appliance.log"
    logs.setup(LoggingConfig(file=str(path)), terminal=True)
    assert len(_ours()) == 2
    logging.getLogger("appliance").info("both", extra={"status": 200})
    err = capsys.readouterr().err
    assert "both" in err and "status=200" in err and "\x1b[" in err  # coloured, readable
    assert not err.lstrip().startswith("{")
    assert json.loads(path.read_text().splitlines()[-1])["event"] == "both"  # the file: JSON


def test_no_file_logs_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert logs.setup(LoggingConfig(file="none"), terminal=False) is None
    logging.getLogger("appliance").info("piped")
    assert json.loads(capsys.readouterr().err.strip())["event"] == "piped"  # auto: JSON to pipes
    logs.setup(LoggingConfig(file="none", format="console"), terminal=False)
    logging.getLogger("appliance").info("plain")
    err = capsys.readouterr().err
    assert "INFO" in err and "plain" in err and "\x1b[" not in err  # no colour off a terminal


@pytest.mark.parametrize(
    ("fmt", "terminal", "kind"),
    [
        ("auto", True, logs.ConsoleFormatter),
        ("auto", False, logs.JsonFormatter),
        ("json", True, logs.JsonFormatter),
        ("console", False, logs.ConsoleFormatter),
        ("text", False, logs.ConsoleFormatter),
    ],
)
def test_formatter_choice(fmt: str, terminal: bool, kind: type) -> None:
    assert type(logs.formatter(fmt, terminal)) is kind


def test_uvicorn_colour_message_never_reaches_json() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "Started %d", (7,), None)
    record.color_message = "Started \x1b[36m%d\x1b[0m"
    rec = json.loads(logs.JsonFormatter().format(record))
    assert rec["event"] == "Started 7" and "color_message" not in rec
    assert "color_message" not in logs.ConsoleFormatter().format(record)


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/responses/abc", "responses"),
        ("/v1/responses", "responses"),
        ("/v1/messagesx", "openai"),
        ("/v1/messages", "anthropic"),
        ("/v1/messages/count_tokens", "anthropic"),
        ("/admin/health", "admin"),
        ("/healthz", "probe"),
        ("/readyz", "probe"),
        ("/metrics", "probe"),
        ("/status", "other"),
        ("/administrator", "other"),
    ],
)
def test_api_of_a_path(path: str, api: str) -> None:
    assert api_of(path) == api
