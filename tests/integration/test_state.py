"""The runtime state file: atomic writes, corrupted / empty / unwritable files, crash-loop rules.

The unit tests use real files in a temp folder; the last ones start real appliances on bad
state files and read what they log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import CrashLoopConfig, StateConfig
from appliance.state import StateStore, default_path, state_path

from ._resilience import BASE

pytestmark = pytest.mark.timeout(120)


def store(tmp_path: Path, starts: int = 3, window_s: float = 60.0) -> StateStore:
    cfg = StateConfig(
        path=str(tmp_path / "state.json"), crash_loop=CrashLoopConfig(starts, window_s)
    )
    return StateStore(cfg)


def read(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state.json").read_text())


def test_default_path_is_in_the_platform_state_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    if os.uname().sysname == "Linux":
        assert default_path() == tmp_path / "appliance" / "state.json"
    assert state_path(StateConfig()) == default_path()
    assert state_path(StateConfig(path="~/x.json")) == Path("~/x.json").expanduser()


def test_first_start_writes_an_unclean_record_and_a_clean_exit_marks_it(tmp_path: Path) -> None:
    s = store(tmp_path)
    boot = s.begin_run(["demo"], now=1000.0)
    assert boot.previous_clean and boot.recover == () and boot.safe_mode_reason is None
    data = read(tmp_path)
    assert data["clean_shutdown"] is False
    assert data["starts"] == [
        {"at": 1000.0, "clean": False, "after_unclean": False, "safe_mode": False}
    ]
    s.mark_clean()
    data = read(tmp_path)
    assert data["clean_shutdown"] is True and data["starts"][-1]["clean"] is True
    # No temp files left behind; the lock file is the only other entry.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]


def test_models_follow_registry_events(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.begin_run(["a", "b"])
    loaded: list[str] = []
    listeners: list[Any] = []
    s.attach(listeners.append, lambda: list(loaded))
    (listener,) = listeners
    loaded.append("a")
    listener("loaded", "a", {})
    loaded.append("b")
    listener("loaded", "b", {})
    loaded.remove("a")
    listener("unloaded", "a", {})
    loaded.remove("b")
    listener("died", "b", {})  # still wanted: a crash now should bring it back
    assert s._models() == ["b"]
    loaded.append("b")
    listener("loaded", "b", {})  # reloaded after the death: not a "recovery"
    assert s.recovered == [] and s.dead == []
    s.mark_clean()  # waits for the queued writes
    assert read(tmp_path)["models"] == ["b"]


def test_unclean_exit_recovers_the_models_it_had(tmp_path: Path) -> None:
    s = store(tmp_path, starts=5)
    s.begin_run(["demo", "demo2"], now=1000.0)
    s.data["models"] = ["demo", "demo2"]
    s._write_now()  # then the process is killed: no mark_clean
    s2 = store(tmp_path, starts=5)
    boot = s2.begin_run(["demo", "demo2"], now=1010.0)
    assert not boot.previous_clean
    assert boot.recover == ("demo", "demo2")
    assert boot.crash_streak == 1 and boot.safe_mode_reason is None  # one crash so far
    # A model no longer in the catalog is not recovered.
    s3 = store(tmp_path, starts=5)
    assert s3.begin_run(["demo"], now=1020.0).recover == ("demo",)


def test_recovery_outcome_is_tracked(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.begin_run(["a", "b"], now=1.0)
    s.data["models"] = ["a", "b"]
    s._write_now()
    s2 = store(tmp_path)
    s2.begin_run(["a", "b"], now=2.0)
    s2.on_model("loaded", "a", {})
    s2.on_model("load_failed", "b", {"error": "no memory"})
    h = s2.health()["recovery"]
    assert h == {
        "requested": ["a", "b"],
        "recovered": ["a"],
        "failed": {"b": "no memory"},
        "pending": [],
    }


def test_crash_loop_needs_n_unclean_starts_within_the_window(tmp_path: Path) -> None:
    reasons = []
    for i in range(5):
        boot = store(tmp_path).begin_run([], now=1000.0 + i)  # each run is killed
        reasons.append(boot.safe_mode_reason)
    # The first start follows no crash; each later one follows one: the fourth start is the
    # third unclean start in a row.
    assert reasons[:3] == [None, None, None]
    assert reasons[3] and "3 unclean starts in a row" in reasons[3]
    assert reasons[4] and "4 unclean starts" in reasons[4]
    # After the window, the old starts no longer count.
    assert store(tmp_path).begin_run([], now=2000.0).safe_mode_reason is None


def test_slow_loads_that_crash_are_a_crash_loop(tmp_path: Path) -> None:
    """A model that takes four minutes to load and kills the process each time: three crashes,
    far apart, still trip the rule with the default window (an hour); a one-minute window, the
    old default, never would."""
    default = StateConfig(path=str(tmp_path / "state.json"))
    assert default.crash_loop.window_s >= 3600
    boots = [StateStore(default).begin_run([], now=1000.0 + 240 * i) for i in range(4)]
    assert [b.crash_streak for b in boots] == [0, 1, 2, 3]
    assert boots[3].safe_mode_reason is not None
    assert boots[3].first_crash_at == 1000.0
    short = tmp_path / "short"
    short.mkdir()
    assert all(
        store(short, window_s=60).begin_run([], now=1000.0 + 240 * i).safe_mode_reason is None
        for i in range(4)
    )


def test_a_clean_run_or_a_stable_run_breaks_the_streak(tmp_path: Path) -> None:
    store(tmp_path).begin_run([], now=1.0)
    s = store(tmp_path)
    s.begin_run([], now=2.0)
    s.mark_clean()
    store(tmp_path).begin_run([], now=3.0)
    store(tmp_path).begin_run([], now=4.0)
    assert store(tmp_path).begin_run([], now=5.0).safe_mode_reason is None  # 2 after the clean
    s = store(tmp_path)
    assert s.begin_run([], now=6.0).safe_mode_reason is not None
    s.mark_stable()
    assert len(read(tmp_path)["starts"]) == 1
    assert store(tmp_path).begin_run([], now=7.0).safe_mode_reason is None  # normal again


def test_a_crash_after_safe_mode_ended_keeps_the_streak(tmp_path: Path) -> None:
    """Safe mode ended (by an admin or by itself) and the run then crashed before it ran stable:
    the next start is in safe mode again at once."""
    for i in range(3):
        store(tmp_path).begin_run([], now=float(i))
    s = store(tmp_path)
    assert s.begin_run([], now=3.0).safe_mode_reason is not None
    s.safe_mode_ended("admin")
    data = read(tmp_path)
    assert (
        data["safe_mode_reason"] is None and data["starts"][-1]["safe_mode_exit"]["by"] == "admin"
    )
    assert store(tmp_path).begin_run([], now=4.0).safe_mode_reason is not None  # killed again


def test_lifetime_counters_survive_restarts(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.begin_run([], now=1.0)
    s.mark_clean()
    store(tmp_path).begin_run([], now=2.0)  # killed
    store(tmp_path).begin_run([], now=3.0)  # killed
    s = store(tmp_path)
    s.begin_run([], now=4.0)
    assert s.lifetime() == {"process_starts": 4, "unclean_starts": 2}
    assert read(tmp_path)["lifetime"] == {"process_starts": 4, "unclean_starts": 2}
    assert s.health()["lifetime"] == s.lifetime()


@pytest.mark.parametrize(
    "content, why",
    [
        (b"{not json", "is corrupted"),
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b'["a list"]', "is corrupted"),
        (b'{"models": "demo"}', "is corrupted"),
        (b'{"lifetime": {"process_starts": "many"}}', "is corrupted"),
        (b"\xff\xfe\x00garbage", "is corrupted"),
    ],
)
def test_bad_files_are_moved_aside(
    tmp_path: Path, content: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_bytes(content)
    s = store(tmp_path)
    boot = s.begin_run(["demo"])
    assert boot.previous_clean and boot.recover == ()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert read(tmp_path)["clean_shutdown"] is False  # a fresh file
    assert why in caplog.text and "moved it to" in caplog.text
    assert s.problem and why in s.problem


def test_unwritable_location_is_logged_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    s = StateStore(StateConfig(path=str(blocker / "state.json")))
    boot = s.begin_run(["demo"])
    assert boot.previous_clean
    assert s.writable is False and "cannot write" in (s.problem or "")
    assert s.save() is False
    s.mark_stable()
    s.mark_clean()
    assert "running without a persistent state" in caplog.text


def test_a_directory_in_place_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    s = store(tmp_path)
    s.begin_run([])
    assert s.writable is False and "is a directory" in (s.problem or "").lower()


# -- real appliances on bad state files -----------------------------------------------------


def _state_file(home: Path) -> Path:
    return home / "state" / "appliance" / "state.json"


def test_server_starts_on_corrupted_empty_and_unwritable_state(
    appliance_factory: Any, tmp_path: Path
) -> None:
    homes = {k: tmp_path / k for k in ("corrupt", "empty", "unwritable")}
    for home in homes.values():
        _state_file(home).parent.mkdir(parents=True)
    _state_file(homes["corrupt"]).write_text('{"clean_shutdown": fal')
    _state_file(homes["empty"]).write_text("")
    blocker = homes["unwritable"] / "blocker"
    blocker.write_text("a file, not a folder")
    apps = {
        "corrupt": appliance_factory(*BASE, home=homes["corrupt"], wait=""),
        "empty": appliance_factory(*BASE, home=homes["empty"], wait=""),
        "unwritable": appliance_factory(
            *BASE, f"state.path={blocker / 'state.json'}", home=homes["unwritable"], wait=""
        ),
    }
    for a in apps.values():
        a.wait_for("/readyz")
        assert (
            httpx.post(
                a.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
            ).status_code
            == 200
        )
    assert "is corrupted" in apps["corrupt"].log() and "moved it to" in apps["corrupt"].log()
    assert list(_state_file(homes["corrupt"]).parent.glob("state.json.corrupt-*"))
    assert json.loads(_state_file(homes["corrupt"]).read_text())["models"] == ["demo"]
    assert "is empty" in apps["empty"].log()
    assert "cannot write" in apps["unwritable"].log()
    assert "running without a persistent state" in apps["unwritable"].log()
    for a in apps.values():
        assert a.stop() == 0
    assert json.loads(_state_file(homes["empty"]).read_text())["clean_shutdown"] is True
