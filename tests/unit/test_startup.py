"""transformers' import table kept between starts (mlx_ext.transformers_imports): same names,
from the cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

PROBE = """
import sys
if sys.argv[1] == "hook":
    from appliance.engine.mlx_ext import transformers_imports as startup
    startup.install()
import transformers, hashlib
names = sorted(dir(transformers))
print(len(names), hashlib.sha256("\\n".join(names).encode()).hexdigest())
"""


def _names(mode: str, cache: Path) -> str:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_transformers_exports_the_same_names_from_the_kept_table(tmp_path: Path) -> None:
    plain = _names("plain", tmp_path)
    assert int(plain.split()[0]) > 1000  # the whole table: thousands of model classes
    kept = tmp_path / "appliance" / "startup"
    assert not kept.exists()
    assert _names("hook", tmp_path) == plain  # built by transformers, then kept
    files = list(kept.glob("transformers-imports-*.pickle"))
    assert files
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert _names("hook", tmp_path) == plain  # read back
    assert {f: f.stat().st_mtime_ns for f in kept.glob("*.pickle")} == stamps  # not rebuilt


def test_an_unreadable_table_is_rebuilt(tmp_path: Path) -> None:
    plain = _names("plain", tmp_path)
    _names("hook", tmp_path)
    for f in (tmp_path / "appliance" / "startup").glob("*.pickle"):
        f.write_bytes(b"not a pickle " + hashlib.sha256(f.name.encode()).digest())
    assert _names("hook", tmp_path) == plain
