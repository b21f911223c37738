"""Maintenance tasks: the runner on its own (asyncio, real metrics), then a real appliance with
every task on a short interval and fault injection on (APPLIANCE_FAULT_INJECTION=1)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from appliance.config import TASK_NAMES, AppConfig, MaintenanceConfig, MetricsConfig
from appliance.metrics import Metrics
from appliance.tasks import TASKS, TaskContext, TaskRunner

from ._resilience import ADMIN_KEY, BASE, admin_get, loaded, metric, wait_until

pytestmark = pytest.mark.timeout(120)

APPLIANCE_ENV = {"APPLIANCE_FAULT_INJECTION": "1", "LMX_ADMIN_KEY": ADMIN_KEY}
APPLIANCE_OVERRIDES = (
    *BASE,
    "+models.catalog.demo2.path=builtin:demo",
    "+models.catalog.demo2.ttl_s=1",
    "+models.catalog.demo.ttl_s=1",  # but pinned: demo is in auto_load
    "maintenance.idle_eviction.interval_s=0.3",
    "maintenance.state_snapshot.interval_s=0.3",
    "maintenance.cache_trim.interval_s=0.3",
    "maintenance.cache_trim.max_cache_bytes=0",
    "maintenance.memory_watchdog.interval_s=0.3",
    "maintenance.helper_probe.interval_s=0.3",
    "maintenance.memory_watchdog.warn_margin_percent=100",  # always "near" shedding
)


def test_the_table_has_every_configured_task() -> None:
    assert set(TASKS) == set(TASK_NAMES)


def test_runner_counts_a_failure_and_runs_again_then_stops_cleanly() -> None:
    cfg = MaintenanceConfig()
    for name in TASK_NAMES:
        getattr(cfg, name).interval_s = 0.01
        getattr(cfg, name).enabled = name == "state_snapshot"
    calls: list[int] = []

    def flaky(ctx: TaskContext) -> Any:
        async def run() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("bad threshold")

        return run

    metrics = Metrics(MetricsConfig(namespace="t"), CollectorRegistry())
    runner = TaskRunner(
        cfg,
        TaskContext(AppConfig(), engine=None),
        metrics,  # type: ignore[arg-type]
        table={"state_snapshot": flaky},
    )

    async def main() -> list[asyncio.Task[None]]:
        tasks = runner.start()
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        await runner.stop()
        return tasks

    tasks = asyncio.run(main())
    assert all(t.cancelled() for t in tasks)
    stats = runner.status()["state_snapshot"]
    assert stats["failures"] == 1 and stats["runs"] >= 3 and stats["last_error"] is None
    text = metrics.render().decode()
    assert 't_maintenance_task_failures_total{task="state_snapshot"} 1.0' in text
    assert 't_maintenance_task_duration_seconds_count{task="state_snapshot"}' in text
    assert list(runner.runs) == ["state_snapshot"]  # disabled tasks are not run at all


@pytest.fixture(scope="module")
def url(module_appliance: Any) -> str:
    return str(module_appliance.url)


def test_a_task_that_raises_is_logged_counted_and_runs_again(
    module_appliance: Any, url: str
) -> None:
    labels = {"task": "state_snapshot"}
    assert metric(url, "lmx_maintenance_task_failures_total", **labels) in (None, 0.0)
    r = httpx.post(url + "/testing/faults", json={"task": "state_snapshot"}, timeout=10)
    assert r.status_code == 200, r.text
    wait_until(
        lambda: metric(url, "lmx_maintenance_task_failures_total", **labels) == 1.0,
        timeout=10,
        what="the failure counted",
    )
    runs = metric(url, "lmx_maintenance_task_runs_total", **labels) or 0
    wait_until(
        lambda: (metric(url, "lmx_maintenance_task_runs_total", **labels) or 0) >= runs + 2,
        timeout=10,
        what="the next runs",
    )
    assert metric(url, "lmx_maintenance_task_failures_total", **labels) == 1.0
    assert httpx.get(url + "/readyz", timeout=5).status_code == 200
    status = admin_get(url, "/admin/health")["maintenance"]["state_snapshot"]
    assert status["failures"] == 1 and status["last_error"] is None
    assert "maintenance task state_snapshot failed" in module_appliance.log()
    assert "injected fault" in module_appliance.log()


def test_every_task_reports_runs_and_durations(url: str) -> None:
    for name in (
        "idle_eviction",
        "state_snapshot",
        "cache_trim",
        "memory_watchdog",
        "helper_probe",
    ):
        wait_until(
            lambda n=name: (
                (metric(url, "lmx_maintenance_task_duration_seconds_count", task=n) or 0) > 0
            ),
            timeout=20,
            what=f"{name} runs",
        )


def test_ttl_eviction_unloads_an_idle_model_and_it_loads_again(
    module_appliance: Any, url: str
) -> None:
    def complete(model: str) -> None:
        r = httpx.post(
            url + "/v1/completions",
            json={"model": model, "prompt": "hi", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text

    def loads() -> float:
        return metric(url, "lmx_model_load_seconds_count", model="demo2") or 0.0

    before = loads()
    complete("demo2")  # loads it on demand (a ttl_s of 1 s may evict it again at once)
    assert loads() == before + 1
    wait_until(lambda: "demo2" not in loaded(url), timeout=10, what="demo2 evicted")
    assert "idle_eviction: unloading demo2" in module_appliance.log()
    assert "demo" in loaded(url)  # pinned: in auto_load
    assert "idle_eviction: unloading demo," not in module_appliance.log()
    complete("demo2")  # and loads it again
    assert loads() == before + 2


def test_memory_watchdog_flips_health_to_degraded(module_appliance: Any, url: str) -> None:
    def degraded() -> Any:
        h = admin_get(url, "/admin/health")
        return h["status"] == "degraded" and [
            r for r in h["reasons"] if "of the shedding threshold" in r["reason"]
        ]

    wait_until(degraded, timeout=10, what="degraded health")
    assert "memory_watchdog: system memory" in module_appliance.log()


def test_cache_trim_clears_the_mlx_cache_past_its_limit(module_appliance: Any, url: str) -> None:
    r = httpx.post(
        url + "/v1/completions",
        json={"prompt": "a longer prompt " * 20, "max_tokens": 40},
        timeout=60,
    )
    assert r.status_code == 200
    wait_until(lambda: "cache_trim: cleared" in module_appliance.log(), timeout=10, what="a trim")
