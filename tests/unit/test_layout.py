"""The package's shape: commands pickle, every mlx_ext patch is guarded, no work at import."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import subprocess
import sys

import pytest

from appliance.engine import commands, mlx_ext
from appliance.engine.types import SamplingParams


def test_commands_cross_a_process_boundary() -> None:
    cmds = [
        commands.Submit(7, [1, 2, 3], SamplingParams(max_tokens=4)),
        commands.Cancel(7),
        commands.Fault("boom"),
        commands.Stop(),
    ]
    assert [pickle.loads(pickle.dumps(c)) for c in cmds] == cmds


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(mlx_ext.__path__)])
def test_each_mlx_ext_patch_names_its_versions_and_is_usable_here(name: str) -> None:
    module = importlib.import_module(f"appliance.engine.mlx_ext.{name}")
    assert isinstance(module.TARGETS, str) and module.TARGETS
    # The installed versions are the ones each was written for: a bump that breaks an
    # assumption shows here, not as a silent fallback in production.
    assert module.usable(), f"{name} is not usable with the installed libraries ({module.TARGETS})"


def test_importing_the_entry_point_does_no_work() -> None:
    code = (
        "import sys, appliance.__main__; "
        "print(sorted(m for m in ('mlx.core', 'transformers', 'mlx_lm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
