"""Start-up time: transformers' lazy import table, kept between starts.

`import transformers` (5.x) builds the table of what each of its model modules exports by reading
the source of every one of them, some 3,300 files: about 1 s of a 2.5 s cold start on a 2-core
x86 CPU, paid again at every start although it only changes when transformers is reinstalled.
`install()` (called before anything imports transformers) wraps that one function so its result
is kept in the user cache folder, keyed by the files it depends on (the models folder and the two
modules that build the table, by path and mtime), and read back at the next start.

Anything unexpected (another transformers layout, an unreadable cache) falls back to
transformers' own code: this can only make a start slower, never different.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import logging
import os
import pickle
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

log = logging.getLogger("appliance.startup")

_TARGET = "transformers.utils.import_utils"
TARGETS = "transformers 5.x (utils.import_utils.define_import_structure)"


def usable() -> bool:
    """Whether the installed transformers is the major version this was written against
    (read from its metadata, without importing it)."""
    from importlib import metadata

    try:
        return metadata.version("transformers").split(".")[0] == "5"
    except metadata.PackageNotFoundError:
        return False


def _cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_path("appliance")) / "startup"


def _key(module: ModuleType, module_path: Any, prefix: Optional[str]) -> str:
    parts = [str(module_path), str(prefix), sys.version]
    for p in (
        Path(module_path),
        Path(str(module.__file__)),
        Path(str(module.__file__)).parent.parent / "__init__.py",
    ):
        parts += [str(p), str(p.stat().st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cached(module: ModuleType, build: Callable[..., Any]) -> Callable[..., Any]:
    def define_import_structure(module_path: Any, prefix: Optional[str] = None) -> Any:
        try:
            path = _cache_dir() / f"transformers-imports-{_key(module, module_path, prefix)}.pickle"
        except Exception:  # no such layout: transformers' own code
            return build(module_path, prefix)
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except Exception:  # first start, or a cache we can't read: build it and keep it
            pass
        table = build(module_path, prefix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                pickle.dump(table, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except Exception as exc:  # a read-only cache folder: just slower next time
            log.debug("could not keep transformers' import table: %s", exc)
        return table

    return define_import_structure


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers.utils.import_utils the normal way, and wraps its table builder as soon
    as the module has run (before transformers/__init__ uses it)."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            build = getattr(module, "define_import_structure", None)
            if callable(build):
                module.define_import_structure = _cached(module, build)  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Hook transformers' import table (no-op once transformers is imported)."""
    if _TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if not usable():
        return
    sys.meta_path.insert(0, _Finder())
