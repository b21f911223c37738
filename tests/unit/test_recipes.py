"""`python -m appliance.recipes launchd|systemd`: parseable service files for every shipped
profile, carrying the profile and the overrides, and the rendered examples kept current."""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import recipes
from appliance.config import compose, load

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.stem for p in (ROOT / "conf" / "profile").glob("*.yaml"))
SECRET = "s3cret-admin-key-never-written"
# Overrides with characters that need quoting in a unit file.
OVERRIDES = [
    "limits.max_running=3",
    'rate_limits.inference="30/minute"',
    "server.allowed_hosts=[a.lan,b.lan]",
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMX_ADMIN_KEY": SECRET, "LMX_API_KEYS": SECRET + "-api"}
    return subprocess.run(
        [sys.executable, "-m", "appliance.recipes", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def composed(profile: str):  # type: ignore[no-untyped-def]
    return load(compose([f"+profile={profile}", *OVERRIDES]))


def test_profiles_are_found() -> None:
    assert {"mono512", "safe-mode"} <= set(PROFILES)
    assert recipes.shipped_profiles() == PROFILES


@pytest.mark.parametrize("profile", PROFILES)
def test_launchd_plist(profile: str) -> None:
    out = cli("launchd", f"+profile={profile}", *OVERRIDES)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout
    job = plistlib.loads(out.stdout.encode())
    cfg = composed(profile)
    _launchd_valid(job)
    assert "UserName" not in job  # a LaunchAgent runs as the user who loads it
    assert job["Label"] == f"com.appliance.{profile}"
    args = job["ProgramArguments"]
    # sh -c SCRIPT, then the interpreter and its arguments, each intact.
    assert args[:2] == ["/bin/sh", "-c"]
    assert args[3:] == [
        os.path.abspath(sys.executable),
        "-m",
        "appliance",
        f"+profile={profile}",
        *OVERRIDES,
    ]
    assert os.path.isabs(args[3])
    assert ("caffeinate -i" in args[2]) is cfg.service.caffeinate
    assert args[2].rstrip().endswith('exec "$0" "$@"')
    assert job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ThrottleInterval"] == cfg.service.throttle_interval_s
    assert job["ExitTimeOut"] == max(60, int(cfg.server.drain_timeout_s) + 15)
    assert job["AbandonProcessGroup"] is False
    home = str(Path.home())
    assert job["WorkingDirectory"] == home
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert job[key].startswith(f"{home}/Library/Logs/appliance/")
    env = job["EnvironmentVariables"]
    assert not any(k.startswith("LMX_") for k in env)
    assert env["APPLIANCE_KEYS_FILE"] == f"{home}/.config/appliance/keys.env"


def _launchd_valid(job: dict[str, Any]) -> None:
    """What launchd needs: the required keys with their types, and a plist that survives a
    round trip through plistlib (XML and binary) unchanged."""
    for key in recipes.LAUNCHD_REQUIRED:
        assert key in job, key
    assert isinstance(job["Label"], str) and job["Label"]
    assert isinstance(job["ProgramArguments"], list) and all(
        isinstance(a, str) for a in job["ProgramArguments"]
    )
    assert os.path.isabs(job["ProgramArguments"][0])
    assert isinstance(job["ExitTimeOut"], int) and job["ExitTimeOut"] >= 60
    for key in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"):
        assert os.path.isabs(job[key]), key
    for fmt in (plistlib.FMT_XML, plistlib.FMT_BINARY):
        assert plistlib.loads(plistlib.dumps(job, fmt=fmt)) == job


@pytest.mark.parametrize("profile", PROFILES)
def test_launchd_daemon(profile: str) -> None:
    out = cli("launchd", "--daemon", "--user", "svc", f"+profile={profile}", *OVERRIDES)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout
    job = plistlib.loads(out.stdout.encode())
    cfg = composed(profile)
    _launchd_valid(job)
    assert job["Label"] == f"com.appliance.{profile}"
    assert job["UserName"] == "svc"
    assert job["ExitTimeOut"] == max(60, int(cfg.server.drain_timeout_s) + 15)
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert job[key].startswith("/Library/Logs/appliance/")
    keys = job["EnvironmentVariables"]["APPLIANCE_KEYS_FILE"]
    assert keys == "/Library/Application Support/appliance/keys.env"
    assert job["WorkingDirectory"] == "/Library/Application Support/appliance"
    assert ("caffeinate -i" in job["ProgramArguments"][2]) is cfg.service.caffeinate
    assert job["ProgramArguments"][4:] == [
        "-m",
        "appliance",
        f"+profile={profile}",
        *OVERRIDES,
        "logging.file=/Library/Logs/appliance/appliance.log",  # the daemon's log, system-wide
    ]
    t = recipes.target(["logging.file=/srv/llm.log"], "/x/bin/python")
    assert recipes.launchd_plist(t, daemon=True)["ProgramArguments"][-1] == (
        "logging.file=/srv/llm.log"
    )


def test_exit_timeout_leaves_the_drain_its_time() -> None:
    for drain, want in ((0, 60), (30, 60), (45, 60), (46, 61), (60, 75), (300, 315)):
        t = recipes.target([f"server.drain_timeout_s={drain}"], "/x/bin/python")
        assert recipes.launchd_plist(t, "/Users/u")["ExitTimeOut"] == want, drain
        assert recipes.launchd_plist(t, daemon=True, user="u")["ExitTimeOut"] == want
        svc = _unit(recipes.render_systemd(t, "u"))["Service"]
        assert svc["TimeoutStopSec"] == str(want)


def test_mono512_holds_caffeinate_and_safe_mode_does_not() -> None:
    for profile, want in (("mono512", True), ("safe-mode", False)):
        job = plistlib.loads(
            recipes.render_launchd(recipes.target([f"+profile={profile}"])).encode()
        )
        assert ("/usr/bin/caffeinate -i -w $$" in job["ProgramArguments"][2]) is want


def _unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def _exec_words(line: str) -> list[str]:
    # systemd splits like a shell on double quotes and backslashes; `$$` and `%%` are escapes.
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(line)]


@pytest.mark.parametrize("profile", PROFILES)
def test_systemd_unit(profile: str) -> None:
    out = cli("systemd", f"+profile={profile}", "--user", "svc", *OVERRIDES)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout
    unit = _unit(out.stdout)
    cfg = composed(profile)
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert profile in unit["Unit"]["Description"]
    assert "network-online.target" in unit["Unit"]["After"]
    svc = unit["Service"]
    assert _exec_words(svc["ExecStart"]) == [
        os.path.abspath(sys.executable),
        "-m",
        "appliance",
        f"+profile={profile}",
        *OVERRIDES,
    ]
    assert svc["User"] == "svc"
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) > cfg.server.drain_timeout_s
    assert svc["EnvironmentFile"] == "-/etc/appliance/keys.env"
    assert svc["WorkingDirectory"] == "~"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_quoting_round_trips() -> None:
    for arg in ("plain=1", "a b", 'q="x"', "back\\slash", "50%", "$HOME", "x='y'"):
        quoted = recipes.systemd_quote(arg)
        assert _exec_words(quoted) == [arg], (arg, quoted)
        assert "%" not in quoted.replace("%%", "")


def test_a_bad_override_exits_2_with_one_line() -> None:
    for args in (["limits.max_running=0"], ["+profile=nope"], ["no_such_key=1"], ["--cfg", "job"]):
        out = cli("systemd", *args)
        assert out.returncode == 2, (args, out)
        assert out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith("config error:")


def test_config_keys_change_the_files() -> None:
    t = recipes.target(
        [
            "+profile=safe-mode",
            "service.label=lab.llm",
            "service.caffeinate=true",
            "service.working_directory=/srv/llm",
            "service.throttle_interval_s=30",
            "server.drain_timeout_s=100",
        ],
        "/x/bin/python",
    )
    job = plistlib.loads(recipes.render_launchd(t, "/Users/u").encode())
    assert job["Label"] == "lab.llm"
    assert job["WorkingDirectory"] == "/srv/llm"
    assert job["ThrottleInterval"] == 30
    assert job["ExitTimeOut"] == 115
    assert job["StandardErrorPath"] == "/Users/u/Library/Logs/appliance/lab.llm.err.log"
    assert job["ProgramArguments"][3] == "/x/bin/python"
    svc = _unit(recipes.render_systemd(t, "u"))["Service"]
    assert svc["TimeoutStopSec"] == "115" and svc["RestartSec"] == "30"
    assert svc["WorkingDirectory"] == "/srv/llm"


def test_the_launchd_wrapper_reads_the_keys_file_and_execs(tmp_path: Path) -> None:
    """Runs the plist's sh wrapper for real, with a stand-in interpreter that reports what it
    got: the keys from the file, every argument intact, and the wrapper's own PID (exec)."""
    fake = tmp_path / "python"
    fake.write_text(
        '#!/bin/sh\necho "pid=$$"\necho "key=$LMX_ADMIN_KEY"\n'
        'for a in "$@"; do echo "arg=$a"; done\n'
    )
    fake.chmod(0o755)
    keys = tmp_path / "keys.env"
    keys.write_text("LMX_ADMIN_KEY='from file'\n")
    keys.chmod(0o600)
    t = recipes.target(["+profile=safe-mode", *OVERRIDES], str(fake))
    args = plistlib.loads(recipes.render_launchd(t, str(tmp_path)).encode())["ProgramArguments"]
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_KEYS_FILE": str(keys)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    stdout, _ = proc.communicate(timeout=10)
    lines = stdout.splitlines()
    assert lines[0] == f"pid={proc.pid}"
    assert lines[1] == "key=from file"
    assert [ln[4:] for ln in lines[2:]] == ["-m", "appliance", "+profile=safe-mode", *OVERRIDES]
    # No keys file: the appliance starts anyway (and says in its log that admin is closed).
    env["APPLIANCE_KEYS_FILE"] = str(tmp_path / "missing.env")
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=10)
    assert out.returncode == 0 and "key=\n" in out.stdout


def test_rendered_examples_are_up_to_date() -> None:
    want = recipes.rendered_examples()
    stale = [
        rel
        for rel, text in want.items()
        if not (ROOT / "recipes" / rel).is_file()
        or (ROOT / "recipes" / rel).read_text(encoding="utf-8") != text
    ]
    extra = sorted(
        str(p.relative_to(ROOT / "recipes"))
        for sub in ("launchd", "systemd")
        for p in (ROOT / "recipes" / sub).rglob("*")
        if p.is_file() and str(p.relative_to(ROOT / "recipes")) not in want
    )
    assert not stale and not extra, (
        f"recipes/ is out of date (stale: {stale}, not rendered: {extra}); run "
        "`python -m appliance.recipes render --out recipes`"
    )
    for rel in want:
        if rel.endswith(".plist"):
            job = plistlib.loads((ROOT / "recipes" / rel).read_bytes())
            _launchd_valid(job)
            assert job["ProgramArguments"][3] == recipes.EXAMPLE_PYTHON
            assert ("UserName" in job) is rel.startswith("launchd/daemon/")


def test_render_writes_every_file(tmp_path: Path) -> None:
    out = cli("render", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == set(recipes.rendered_examples())
