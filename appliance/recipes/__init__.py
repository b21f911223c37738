"""Service files for a profile:
`python -m appliance.recipes launchd|systemd +profile=NAME [k=v ...]`.

The same composed, validated config as `python -m appliance` decides what is rendered, so a bad
profile or override exits 2 with one line here too. Keys are never written into a service file:
they come from a keys file the service reads at start (see recipes/README.md).

    python -m appliance.recipes launchd +profile=mono512            # a LaunchAgent plist
    python -m appliance.recipes launchd --daemon +profile=mono512   # a LaunchDaemon plist
    python -m appliance.recipes systemd +profile=mono512            # a systemd unit
    python -m appliance.recipes render --out recipes                # the shipped examples
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import plistlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import exits
from ..config import AppConfig, ConfigError, compose, load, shipped_profiles

# The rendered examples in recipes/ use these, so they are the same on every machine.
EXAMPLE_PYTHON = "/opt/appliance/.venv/bin/python"
EXAMPLE_HOME = "/Users/appliance"
EXAMPLE_USER = "appliance"

SYSTEMD_KEYS_FILE = "/etc/appliance/keys.env"
LAUNCHD_KEYS_FILE = ".config/appliance/keys.env"  # under the user's home
# A LaunchDaemon (system domain, runs at boot without a login) keeps its files system-wide.
DAEMON_SUPPORT = "/Library/Application Support/appliance"
DAEMON_KEYS_FILE = f"{DAEMON_SUPPORT}/keys.env"
DAEMON_LOGS = "/Library/Logs/appliance"
# launchd leaves a job only 256 open files by default: too few for a LAN server.
LAUNCHD_NOFILE = 8192
SYSTEMD_NOFILE = 65536
# Seconds the supervisor waits past the drain timeout before it kills the process, and the
# least it ever waits (a state file and a log to write after the drain).
STOP_MARGIN_S = 15
STOP_MIN_S = 60
# What launchd needs in every job of ours; the tests check the rendered plists against it.
LAUNCHD_REQUIRED = (
    "Label",
    "ProgramArguments",
    "RunAtLoad",
    "KeepAlive",
    "ExitTimeOut",
    "StandardOutPath",
    "StandardErrorPath",
)

# sh wrapper of the launchd job: export the keys file (when readable), hold a caffeinate
# assertion tied to this PID (when asked), then exec the interpreter so that launchd's SIGTERM
# reaches the appliance itself and starts its drain. "$0" "$@" keep every argument intact.
_KEYS = 'set -a; if [ -r "$APPLIANCE_KEYS_FILE" ]; then . "$APPLIANCE_KEYS_FILE"; fi; set +a; '
_CAFFEINATE = "/usr/bin/caffeinate -i -w $$ & "
_EXEC = 'exec "$0" "$@"'


@dataclass(frozen=True)
class Target:
    """What the service runs: the interpreter, the profile and the overrides, validated."""

    python: str
    overrides: tuple[str, ...]
    profile: Optional[str]
    cfg: AppConfig

    @property
    def argv(self) -> list[str]:
        return [self.python, "-m", "appliance", *self.overrides]

    @property
    def stop_timeout_s(self) -> int:
        """Seconds launchd (ExitTimeOut) and systemd (TimeoutStopSec) wait after SIGTERM:
        the drain timeout plus a margin, and never less than a minute."""
        return max(STOP_MIN_S, int(math.ceil(self.cfg.server.drain_timeout_s)) + STOP_MARGIN_S)

    def name(self, default_prefix: str) -> str:
        """service.label, else `<prefix>.<profile>` (or just the prefix with no profile)."""
        if self.cfg.service.label:
            return self.cfg.service.label
        sep = "." if default_prefix.startswith("com.") else "-"
        return default_prefix + (sep + self.profile if self.profile else "")


def profile_of(overrides: Sequence[str]) -> Optional[str]:
    name = None
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "profile" and value:
            name = value
    return name


def interpreter(path: Optional[str] = None) -> str:
    """An absolute interpreter path. Symlinks are kept: a venv's python is a link to the base
    interpreter, and resolving it would lose the venv."""
    return os.path.abspath(path or sys.executable)


def target(overrides: Sequence[str], python: Optional[str] = None) -> Target:
    """Compose and validate like `python -m appliance` would; ConfigError when wrong."""
    for o in overrides:
        if o.startswith("-"):
            raise ConfigError(o, None, "key=value overrides and +profile=NAME only")
    cfg = load(compose(list(overrides)))
    return Target(interpreter(python), tuple(overrides), profile_of(overrides), cfg)


# -- launchd


def launchd_plist(
    t: Target, home: Optional[str] = None, *, daemon: bool = False, user: Optional[str] = None
) -> dict[str, Any]:
    """A LaunchAgent job for the target (the user's domain, while they are logged in), or with
    `daemon` a LaunchDaemon (the system domain, from boot) run as `user`, its logs under
    /Library/Logs/appliance and its keys file under /Library/Application Support/appliance."""
    home = home or str(Path.home())
    label = t.name("com.appliance")
    if daemon:
        logs, keys, workdir = DAEMON_LOGS, DAEMON_KEYS_FILE, DAEMON_SUPPORT
    else:
        logs, keys, workdir = f"{home}/Library/Logs/appliance", f"{home}/{LAUNCHD_KEYS_FILE}", home
    script = _KEYS + (_CAFFEINATE if t.cfg.service.caffeinate else "") + _EXEC
    argv = t.argv
    if daemon and t.cfg.logging.file is None:
        # Not the user's own log folder: a daemon's logs belong with the system's.
        argv = [*argv, f"logging.file={DAEMON_LOGS}/appliance.log"]
    job: dict[str, Any] = {"Label": label}
    if daemon:
        # A daemon runs as root unless told otherwise: the appliance never needs root.
        job["UserName"] = user or getpass.getuser()
    job.update(
        {
            "ProgramArguments": ["/bin/sh", "-c", script, *argv],
            "RunAtLoad": True,
            # Restart after a crash or a non-zero exit, not after a clean stop (exit 0).
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": t.cfg.service.throttle_interval_s,
            # launchd sends SIGTERM, then SIGKILL after ExitTimeOut: leave the drain its time.
            "ExitTimeOut": t.stop_timeout_s,
            "AbandonProcessGroup": False,
            "ProcessType": "Interactive",
            "WorkingDirectory": t.cfg.service.working_directory or workdir,
            # The appliance writes its own rotated log (logging.file); under launchd these two
            # get only what happens before logging starts (and a line saying where it went).
            "StandardOutPath": f"{logs}/{label}.out.log",
            "StandardErrorPath": f"{logs}/{label}.err.log",
            "SoftResourceLimits": {"NumberOfFiles": LAUNCHD_NOFILE},
            "EnvironmentVariables": {
                # Not the keys: the file they are read from (KEY='value' lines, mode 600).
                "APPLIANCE_KEYS_FILE": keys,
                "PYTHONUNBUFFERED": "1",
            },
        }
    )
    return job


def render_launchd(
    t: Target, home: Optional[str] = None, *, daemon: bool = False, user: Optional[str] = None
) -> str:
    return plistlib.dumps(
        launchd_plist(t, home, daemon=daemon, user=user), sort_keys=False
    ).decode()


# -- systemd

_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_quote(arg: str) -> str:
    """One ExecStart word: plain when safe, else double-quoted; `%` and `$` escaped as systemd
    wants (`%%`, `$$`)."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(t: Target, user: Optional[str] = None) -> str:
    """A system unit for the target (install it in /etc/systemd/system)."""
    user = user or getpass.getuser()
    name = t.name("appliance")
    what = f"profile {t.profile}" if t.profile else "base config"
    exec_start = " ".join(systemd_quote(a) for a in t.argv)
    lines = [
        f"# {name}.service: rendered by `python -m appliance.recipes systemd"
        + "".join(f" {a}" for a in t.overrides)
        + "`.",
        "# Change the profile or the overrides and render again rather than editing this file.",
        "[Unit]",
        f"Description=LLM serving appliance ({what})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"WorkingDirectory={t.cfg.service.working_directory or '~'}",
        "# The keys (LMX_ADMIN_KEY, LMX_API_KEYS) come from this file, mode 600; never from here.",
        f"EnvironmentFile=-{SYSTEMD_KEYS_FILE}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        f"RestartSec={t.cfg.service.throttle_interval_s}",
        "# A config error exits 2: restarting cannot fix it.",
        f"RestartPreventExitStatus={exits.CONFIG_ERROR}",
        "# SIGTERM starts the drain; the appliance exits 0 within server.drain_timeout_s.",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={t.stop_timeout_s}",
        f"LimitNOFILE={SYSTEMD_NOFILE}",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


# -- the shipped examples


def rendered_examples() -> dict[str, str]:
    """Relative path under recipes/ -> text, for every shipped profile and the dashboard."""
    from .grafana import render_dashboard

    out: dict[str, str] = {}
    for profile in shipped_profiles():
        t = target([f"+profile={profile}"], EXAMPLE_PYTHON)
        out[f"launchd/{t.name('com.appliance')}.plist"] = render_launchd(t, EXAMPLE_HOME)
        out[f"launchd/daemon/{t.name('com.appliance')}.plist"] = render_launchd(
            t, daemon=True, user=EXAMPLE_USER
        )
        out[f"systemd/{t.name('appliance')}.service"] = render_systemd(t, EXAMPLE_USER)
    out["grafana/appliance.json"] = render_dashboard()
    return out


def write_examples(root: Path) -> list[Path]:
    written = []
    for rel, text in rendered_examples().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m appliance.recipes",
        description="Render service files for a profile.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    ld = sub.add_parser("launchd", help="print a launchd plist (a LaunchAgent, or --daemon)")
    ld.add_argument("--python", help="interpreter path (default: this one)")
    ld.add_argument("--home", help="the user's home (LaunchAgent; default: yours)")
    ld.add_argument(
        "--daemon",
        action="store_true",
        help="a LaunchDaemon: system domain, starts at boot, runs as --user",
    )
    ld.add_argument("--user", help="the LaunchDaemon's UserName (default: you)")
    sd = sub.add_parser("systemd", help="print a systemd unit")
    sd.add_argument("--python", help="interpreter path (default: this one)")
    sd.add_argument("--user", help="the service's user (default: you)")
    rd = sub.add_parser("render", help="write the examples for every shipped profile")
    rd.add_argument("--out", default="recipes", help="the recipes folder (default: recipes)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in ("launchd", "systemd"):
            t = target(overrides, args.python)
            if args.command == "launchd":
                sys.stdout.write(render_launchd(t, args.home, daemon=args.daemon, user=args.user))
            else:
                sys.stdout.write(render_systemd(t, args.user))
            return 0
        if overrides:
            raise ConfigError(overrides[0], None, f"no overrides for `{args.command}`")
        for path in write_examples(Path(args.out)):
            print(path)
        return 0
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return exits.CONFIG_ERROR
