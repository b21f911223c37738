"""`python -m appliance.launch [+profile=...] distributed.hosts=[h0,h1,...] [overrides]`.

Starts one appliance rank per host. Local ranks (127.0.0.1 / localhost) are spawned here with
the ring backend and a hostfile of our own, and signals are forwarded to them: `mlx.launch`
alone spins the CPU when its stdin is closed and leaves ranks behind on SIGTERM. A group with
remote hosts is handed to MLX's launcher (`mlx.launch --hostfile ...`).

Rank 0 serves HTTP. If another rank dies, rank 0 is told (SIGUSR1): it turns /readyz 503,
fails its in-flight requests and exits non-zero, and so does this launcher, so the supervisor
restarts the whole group. SIGTERM/SIGINT go to rank 0, which drains and stops every rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import exits
from .config import ConfigError, load, register_schemas
from .engine.distributed import RANK_ENV, SIZE_ENV

LOCAL = ("127.0.0.1", "localhost")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


def ring_hostfile(hosts: list[str], folder: Path) -> Path:
    """MLX's ring hostfile: one list of ip:port per rank."""
    ports = _free_ports(len(hosts))
    path = folder / "hostfile.json"
    path.write_text(
        json.dumps(
            [[f"{'127.0.0.1' if h in LOCAL else h}:{p}"] for h, p in zip(hosts, ports, strict=True)]
        )
    )
    return path


def main(argv: Optional[list[str]] = None) -> int:
    from .config import compose
    from .main import fail

    args = list(sys.argv[1:] if argv is None else argv)
    register_schemas()
    try:
        cfg = load(compose(args))
    except ConfigError as exc:
        fail(exc)
    hosts = list(cfg.distributed.hosts)
    if len(hosts) < 2:
        print(
            "config error: distributed.hosts needs at least two hosts; allowed: a list such as "
            "[127.0.0.1,127.0.0.1]",
            file=sys.stderr,
        )
        return 2
    if any(h not in LOCAL for h in hosts):
        return _remote(args, cfg.distributed.backend, hosts, cfg.distributed.hostfile)
    if cfg.distributed.backend != "ring":
        print("config error: distributed.backend must be ring for local ranks", file=sys.stderr)
        return 2
    return _local(args, hosts)


def _remote(args: list[str], backend: str, hosts: list[str], hostfile: Optional[str]) -> int:
    cmd = [sys.executable, "-m", "mlx.launch", "--backend", backend]
    cmd += ["--hostfile", hostfile] if hostfile else ["--hosts", ",".join(hosts)]
    cmd += ["--env", f"{SIZE_ENV}={len(hosts)}", "--", "-m", "appliance", *args]
    print("remote hosts: handing the group to MLX's launcher:", " ".join(cmd), file=sys.stderr)
    with open(os.devnull, "rb") as devnull:
        return subprocess.call(cmd, stdin=devnull)


def _local(args: list[str], hosts: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="appliance-ring-"))
    hostfile = ring_hostfile(hosts, tmp)
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(len(hosts)):
        env = {
            **os.environ,
            "MLX_RANK": str(rank),
            "MLX_HOSTFILE": str(hostfile),
            RANK_ENV: str(rank),
            SIZE_ENV: str(len(hosts)),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "appliance", *args], env=env, stdin=subprocess.DEVNULL
            )
        )
    stopping = {"flag": False}

    def forward(sig: int, frame: object) -> None:
        stopping["flag"] = True
        if procs[0].poll() is None:
            procs[0].send_signal(sig)  # rank 0 drains, then stops the other ranks

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if codes[0] is not None:
                code = codes[0]
                break
            # A rank that exits 0 was stopped by rank 0, which exits next.
            dead = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if dead and not stopping["flag"]:
                print(
                    f"rank {dead[0]} exited with {codes[dead[0]]}: stopping the group",
                    file=sys.stderr,
                )
                procs[0].send_signal(signal.SIGUSR1)
                try:
                    procs[0].wait(15)
                except subprocess.TimeoutExpired:
                    procs[0].kill()
                code = exits.PEER_FAILED
                break
            time.sleep(0.1)
    finally:
        deadline = time.monotonic() + 10
        for p in procs[1:]:
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
