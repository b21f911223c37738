"""The config tree: every profile composes and validates; bad overrides exit 2 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from appliance.config import AppConfig, ConfigError, compose, conf_dir, load

pytestmark = pytest.mark.timeout(60)

PROFILES = sorted(p.stem for p in (conf_dir() / "profile").glob("*.yaml"))


def test_there_are_profiles() -> None:
    assert {"mono512", "safe-mode"} <= set(PROFILES)


def test_base_config_is_loopback_with_smollm2() -> None:
    cfg = load(compose([]))
    assert cfg.server.host == "127.0.0.1"
    assert cfg.models.catalog[cfg.models.default].path == "builtin:smollm2"
    assert cfg.models.catalog["demo"].path == "builtin:demo"
    assert cfg.models.default in cfg.models.auto_load
    assert cfg.rate_limits.inference is None and cfg.rate_limits.admin is None


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_composes_and_converts(profile: str) -> None:
    composed = compose([f"+profile={profile}"])
    typed = load(composed)
    assert isinstance(typed, AppConfig)
    # The profile's own values win over the base (`_self_` first in the defaults list).
    own = OmegaConf.load(conf_dir() / "profile" / f"{profile}.yaml")
    for section in ("limits", "shedding"):
        for key, value in (own.get(section) or {}).items():
            assert getattr(getattr(typed, section), key) == value, f"{section}.{key}"


def test_mono512_values() -> None:
    cfg = load(compose(["+profile=mono512"]))
    assert cfg.models.default == "qwen3-235b"
    assert cfg.rate_limits.inference == "60/minute"
    assert cfg.rate_limits.admin == "10/minute"
    assert cfg.limits.max_running > load(compose([])).limits.max_running


def test_mono512_uses_the_hardening_thresholds() -> None:
    cfg = load(compose(["+profile=mono512"]))
    trim = cfg.maintenance.cache_trim
    assert trim.interval_s == 300 and trim.max_cache_bytes == 50 * 10**9
    assert cfg.shedding.retry_after_s == 10
    assert "127.0.0.1/32" in cfg.security.metrics_allow


def test_queue_timeout_is_bounded() -> None:
    assert load(compose(["limits.queue_timeout_s=300"])).limits.queue_timeout_s == 300
    for bad in ("0", "-1", "300.5"):
        with pytest.raises(ConfigError) as info:
            load(compose([f"limits.queue_timeout_s={bad}"]))
        assert info.value.key == "limits.queue_timeout_s"


def test_every_threshold_states_its_unit_and_range() -> None:
    """A numeric key with a range check says its unit in the reference (seconds, bytes, ...)."""
    from appliance.config import reference

    bare = [
        k.path
        for k in reference.keys()
        if k.type in ("integer", "number") and k.allowed and not any(c.isalpha() for c in k.allowed)
    ]
    assert not bare, f"keys whose allowed text has no unit: {bare}"


def test_safe_mode_values() -> None:
    cfg = load(compose(["+profile=safe-mode"]))
    assert cfg.models.auto_load == []
    assert cfg.limits.max_running == 1


def test_override_on_top_of_a_profile() -> None:
    cfg = load(compose(["+profile=mono512", "limits.max_running=16", "server.port=1234"]))
    assert cfg.limits.max_running == 16
    assert cfg.server.port == 1234


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["limits.max_running=abc"], "limits.max_running"),
        (["limits.max_queued=-1"], "limits.max_queued"),
        (["shedding.memory_percent=0"], "shedding.memory_percent"),
        (["shedding.memory_percent=101"], "shedding.memory_percent"),
        (["middleware=[request_id,teleport]"], "middleware[1]"),
        (["models.auto_load=[nope]"], "models.auto_load[0]"),
        (["logging.rotation=4"], "logging.rotation"),
        (["+limits.turbo=1"], "limits.turbo"),
    ],
)
def test_load_names_the_bad_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(compose(overrides))
    assert info.value.key == key
    assert "\n" not in str(info.value)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(cwd / "state"), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "key", "says"),
    [
        (["limits.max_running=abc"], "limits.max_running", "an integer"),
        (["limits.max_queued=-1"], "limits.max_queued", ">= 0"),
        (["shedding.memory_percent=0"], "shedding.memory_percent", "<= 100"),
        (["shedding.memory_percent=101"], "shedding.memory_percent", "<= 100"),
        (["middleware=[request_id,teleport]"], "middleware[1]", "rate_limit"),
        (["models.auto_load=[nope]"], "models.auto_load[0]", "demo"),
        (["limits.turbo=1"], "limits.turbo", "a key of the config"),
        (["+limits.turbo=1"], "limits.turbo", "a key of the config"),
        # A schema key the YAML leaves out: the message says how to add it.
        (
            ["models.catalog.demo.prefill_batch_size=4"],
            "models.catalog.demo.prefill_batch_size",
            "+models.catalog.demo.prefill_batch_size=4",
        ),
        (["+profile=nope"], "profile", "mono512, safe-mode"),
        (["profile=mono512"], "profile", "+profile=NAME"),
        (["+profile=mono512", "server.port=99999"], "server.port", "65535"),
        (["limits.queue_timeout_s=0"], "limits.queue_timeout_s", "0 < value <= 300 seconds"),
        (["limits.queue_timeout_s=301"], "limits.queue_timeout_s", "0 < value <= 300 seconds"),
        (["security.metrics_allow=[10.0.0.300/32]"], "security.metrics_allow[0]", "networks"),
        (["logging.format=xml"], "logging.format", "auto | json | console"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_override_exits_2_with_one_line(
    args: list[str], key: str, says: str, tmp_path: Path
) -> None:
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    proc = _run("+profile=mono512", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.models.default == "qwen3-235b"
    assert "qwen3-235b" in printed.models.catalog
    assert printed.limits.max_running == 32
    assert printed.rate_limits.inference == "60/minute"
    assert "hydra" not in printed
    # Printing runs nothing: no server, no outputs/ folder, no log file.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_catalog_entry_starts_from_its_preset() -> None:
    cfg = load(
        compose(
            [
                "+models.presets.agent-32k={context_length:32768,max_tokens:4096}",
                "+models.catalog.coder.path=/models/coder.gguf",
                "+models.catalog.coder.preset=agent-32k",
                "+models.catalog.coder.max_tokens=1024",
            ]
        )
    )
    coder = cfg.models.catalog["coder"]
    assert (coder.context_length, coder.max_tokens) == (32768, 1024)  # its own key wins


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["+models.catalog.coder.path=/m", "+models.catalog.coder.preset=nope"],
            "models.catalog.coder.preset",
        ),
        (["+models.presets.p={warp:1}"], "models.presets.p.warp"),
        (["+models.presets.p={path:/x}"], "models.presets.p.path"),
        (["+models.presets.p={context_length:3}"], "models.presets.p.context_length"),
    ],
)
def test_a_bad_preset_names_its_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(compose(overrides))
    assert info.value.key == key
