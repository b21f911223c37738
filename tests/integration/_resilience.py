"""Small helpers shared by the resilience tests (state, crash, drain, tasks, helpers, engine)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import httpx

T = TypeVar("T")

ADMIN_KEY = "test-admin-key"
ADMIN_ENV = {"LMX_ADMIN_KEY": ADMIN_KEY}
# Quiet, fast and reproducible: no log file (stderr is kept by the fixture).
BASE = ("logging.file=none",)


def wait_until(
    fn: Callable[[], Optional[T]],
    timeout: float = 30.0,
    every: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll fn until it returns something truthy; that value, or AssertionError at the timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def metric(url: str, name: str, **labels: str) -> Optional[float]:
    """One sample of /metrics by full name and labels; None when absent."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric_name, _, rest = series.partition("{")
        if metric_name != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == want:
            return float(value)
    return None


def admin_get(url: str, path: str) -> Any:
    r = httpx.get(url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def admin_post(url: str, path: str, body: dict[str, Any], timeout: float = 60) -> Any:
    r = httpx.post(
        url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=timeout
    )
    assert r.status_code == 200, r.text
    return r.json()


def loaded(url: str) -> list[str]:
    data = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in data if m.get("loaded")]


class Stream(threading.Thread):
    """One streamed /v1/completions request read on its own thread."""

    def __init__(self, url: str, prompt: str, max_tokens: int, model: Optional[str] = None) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
        if model:
            self.body["model"] = model
        self.status: Optional[int] = None
        self.datas: list[str] = []
        self.texts: list[str] = []
        self.error: Optional[BaseException] = None
        self.got_tokens = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/completions", json=self.body, timeout=120
            ) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    self.datas.append(data)
                    if data != "[DONE]":
                        chunk = json.loads(data)
                        if (
                            "choices" in chunk
                            and chunk["choices"]
                            and chunk["choices"][0].get("text")
                        ):
                            self.texts.append(chunk["choices"][0]["text"])
                            self.got_tokens.set()
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def done(self) -> bool:
        return bool(self.datas) and self.datas[-1] == "[DONE]"

    @property
    def finish_reason(self) -> Optional[str]:
        for data in reversed(self.datas):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            if choices and choices[0].get("finish_reason"):
                return str(choices[0]["finish_reason"])
        return None

    @property
    def errors(self) -> list[dict[str, Any]]:
        out = []
        for data in self.datas:
            if data != "[DONE]":
                chunk = json.loads(data)
                if "error" in chunk:
                    out.append(chunk["error"])
        return out
