"""Time to /readyz 200 and the first requests' latency of a fresh server, with MLX's kernel
cache (MLX_PTX_CACHE_DIR) empty, as on a machine that never ran MLX.

    python3 -m benchmarks.accelerator.cold_first_request MODEL_DIR [ROUNDS]

Prints, per round: seconds to /readyz 200, then the seconds of three short completions.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

MODEL = sys.argv[1]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
PORT = 8391


def get(path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=2) as r:
            return r.status
    except Exception:
        return 0


def complete() -> float:
    body = json.dumps({"model": "demo", "prompt": "Hello there", "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/v1/completions", body, {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - t0


for _ in range(ROUNDS):
    env = {**os.environ, "MLX_PTX_CACHE_DIR": tempfile.mkdtemp(prefix="ptx-")}
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            f"++server.port={PORT}",
            "++server.host=127.0.0.1",
            f"++models.catalog.demo.path={MODEL}",
            "++models.auto_load=[demo]",
            "++logging.file=none",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open("/tmp/cold_server.log", "a"),
    )
    try:
        while get("/readyz") != 200:
            if server.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit("the server did not get ready")
            time.sleep(0.1)
        ready = time.perf_counter() - t0
        firsts = [complete() for _ in range(3)]
        print(f"ready {ready:.2f} s; requests {' '.join(f'{x:.3f}' for x in firsts)} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
