"""TLS through uvicorn with a self-signed certificate made here, and `security.exposure: public`
refusing to start without keys or TLS (exit 2, one line)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.config import ConfigError, compose, load

pytestmark = pytest.mark.timeout(120)

KEY = "sk-tls-test-8080"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (the openssl CLI: the venv has no
    `cryptography`)."""
    d = tmp_path_factory.mktemp("tls")
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(keyfile),
            "-out",
            str(certfile),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return certfile, keyfile


def wait_https(a: Any, url: str, ctx: ssl.SSLContext, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    with httpx.Client(verify=ctx, timeout=2) as client:
        while time.monotonic() < deadline:
            if a.proc.poll() is not None:
                raise RuntimeError(f"appliance exited {a.proc.returncode}:\n{a.log()}")
            try:
                if client.get(url + "/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(a.log())


def test_openai_client_over_https(appliance_factory: Any, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    # Public exposure is allowed here: keys and TLS are both set.
    a = appliance_factory(
        f"server.tls.certfile={certfile}",
        f"server.tls.keyfile={keyfile}",
        "security.exposure=public",
        env={"LMX_API_KEYS": KEY},
        wait="",
    )
    url = f"https://127.0.0.1:{a.port}"
    ctx = ssl.create_default_context(cafile=str(certfile))
    wait_https(a, url, ctx)

    with httpx.Client(verify=ctx, timeout=60) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, http_client=http, max_retries=0)
        out = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert out.choices[0].message.content is not None
        assert out.usage is not None and out.usage.completion_tokens >= 1
        stream = client.completions.create(model="demo", prompt="a", max_tokens=3, stream=True)
        assert len(list(stream)) >= 1
        assert http.get(url + "/healthz").status_code == 200

    # Not trusted without the certificate: the TLS is real, not plain HTTP on another port.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url + "/healthz", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{a.port}/healthz", timeout=5)


def _load(overrides: list[str]) -> Any:
    return load(compose(overrides))


def test_public_exposure_rules(monkeypatch: pytest.MonkeyPatch, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    tls = [f"server.tls.certfile={certfile}", f"server.tls.keyfile={keyfile}"]
    monkeypatch.delenv("LMX_API_KEYS", raising=False)
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        _load(["security.exposure=public", *tls])
    assert info.value.key == "security.api_keys" and "LMX_API_KEYS" in str(info.value)

    monkeypatch.setenv("LMX_API_KEYS", KEY)
    with pytest.raises(ConfigError) as info:
        _load(["security.exposure=public"])
    assert info.value.key == "server.tls.certfile"
    assert "behind_tls_proxy" in str(info.value)
    assert KEY not in str(info.value)

    assert _load(["security.exposure=public", *tls]).security.exposure == "public"
    assert (
        _load(["security.exposure=public", "security.behind_tls_proxy=true"]).server.tls.certfile
        is None
    )
    assert _load([]).security.exposure == "lan"  # lan: neither needed

    with pytest.raises(ConfigError) as info:
        _load(
            [
                f"server.tls.certfile={certfile.parent / 'missing.pem'}",
                f"server.tls.keyfile={keyfile}",
            ]
        )
    assert info.value.key == "server.tls.certfile"
    with pytest.raises(ConfigError) as info:
        _load([f"server.tls.certfile={certfile}"])
    assert info.value.key == "server.tls"


def test_public_without_keys_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LMX_API_KEYS", "LMX_ADMIN_KEY")}
    p = subprocess.run(
        [sys.executable, "-m", "appliance", "security.exposure=public"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: security.api_keys"), p.stderr
