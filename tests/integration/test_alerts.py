"""The Prometheus rules and the Grafana dashboard: valid, firing when they should, and using only
metrics a running appliance really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from appliance.recipes.grafana import dashboard, expressions

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "recipes" / "prometheus"
GRAFANA = ROOT / "recipes" / "grafana" / "appliance.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian/Ubuntu: apt-get install prometheus); "
    "the rules were not checked by promtool",
)

METRIC = re.compile(r"\blmx_[A-Za-z0-9_:]+")
# Suffix of a sample name -> the family types that expose it.
SUFFIXES = {
    "_bucket": ("histogram",),
    "_sum": ("histogram", "summary"),
    "_count": ("histogram", "summary"),
    "_total": ("counter",),
}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def used_metric_names() -> dict[str, set[str]]:
    """Sample names (lmx_*) each source uses."""
    out: dict[str, set[str]] = {"alerts.yml": set(), "appliance.json": set()}
    for rule in alert_rules():
        out["alerts.yml"].update(METRIC.findall(rule["expr"]))
    committed = json.loads(GRAFANA.read_text())
    for expr in expressions(committed):
        out["appliance.json"].update(METRIC.findall(expr))
    return out


def exported(families: dict[str, str], sample: str) -> bool:
    """Whether a sample name belongs to a family the appliance exports (with its HELP/TYPE
    lines, even while it has no children)."""
    if families.get(sample) in ("gauge", "counter", "untyped", "info", "histogram", "summary"):
        return True  # gauges, and info/bucket-less names as exposed
    for suffix, types in SUFFIXES.items():
        if sample.endswith(suffix) and families.get(sample[: -len(suffix)]) in types:
            return True
    return False


# -- promtool


@needs_promtool
def test_rules_pass_promtool() -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_scrape_config_passes_promtool() -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "config", str(PROM / "prometheus.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


LBL = 'instance="studio:8080", job="appliance"'
BASE = {"instance": "studio:8080", "job": "appliance"}

# (alert, input series, eval time, expected extra labels or None when it must not fire)
CASES: list[tuple[str, list[tuple[str, str]], str, Any]] = [
    ("ApplianceDown", [(f"up{{{LBL}}}", "1 1 0x20")], "3m", {}),
    ("ApplianceDown", [(f"up{{{LBL}}}", "1x20")], "3m", None),
    (
        "ApplianceNotReady",
        [
            (f"lmx_models_loaded{{{LBL}}}", "0x40"),
            (f"lmx_draining{{{LBL}}}", "0x40"),
            (f"lmx_generation_threads_alive{{{LBL}}}", "0x40"),
        ],
        "6m",
        {},
    ),
    (
        "ApplianceNotReady",
        [
            (f"lmx_models_loaded{{{LBL}}}", "0x40"),
            (f"lmx_draining{{{LBL}}}", "0x40"),
            (f"lmx_generation_threads_alive{{{LBL}}}", "0x40"),
        ],
        "4m",
        None,
    ),
    (
        "ApplianceNotReady",
        [
            (f"lmx_models_loaded{{{LBL}}}", "1x40"),
            (f"lmx_draining{{{LBL}}}", "0x40"),
            (f"lmx_generation_threads_alive{{{LBL}}}", "0x40"),
        ],
        "6m",
        {},
    ),
    (
        "ApplianceNotReady",
        [
            (f"lmx_models_loaded{{{LBL}}}", "1x40"),
            (f"lmx_draining{{{LBL}}}", "0x40"),
            (f"lmx_generation_threads_alive{{{LBL}}}", "1x40"),
        ],
        "6m",
        None,
    ),
    (
        "ApplianceQueueSaturated",
        [(f"lmx_num_requests_waiting{{{LBL}}}", "32x20"), (f"lmx_queue_limit{{{LBL}}}", "32x20")],
        "3m",
        {},
    ),
    (
        "ApplianceQueueSaturated",
        [(f"lmx_num_requests_waiting{{{LBL}}}", "31x20"), (f"lmx_queue_limit{{{LBL}}}", "32x20")],
        "3m",
        None,
    ),
    (
        "ApplianceBusyRejections",
        [(f'lmx_rejected_requests_total{{{LBL}, reason="busy"}}', "0+30x80")],
        "15m",
        {},
    ),
    (
        "ApplianceBusyRejections",
        [(f'lmx_rejected_requests_total{{{LBL}, reason="shed"}}', "0+30x80")],
        "15m",
        None,
    ),
    (
        "ApplianceTTFTHigh",
        [
            (f'lmx_time_to_first_token_seconds_bucket{{{LBL}, model="demo", le="5.0"}}', "0x80"),
            (
                f'lmx_time_to_first_token_seconds_bucket{{{LBL}, model="demo", le="10.0"}}',
                "0+10x80",
            ),
            (
                f'lmx_time_to_first_token_seconds_bucket{{{LBL}, model="demo", le="+Inf"}}',
                "0+10x80",
            ),
        ],
        "16m",
        {"model": "demo"},
    ),
    (
        "ApplianceTTFTHigh",
        [
            (f'lmx_time_to_first_token_seconds_bucket{{{LBL}, model="demo", le="1.0"}}', "0+10x80"),
            (
                f'lmx_time_to_first_token_seconds_bucket{{{LBL}, model="demo", le="+Inf"}}',
                "0+10x80",
            ),
        ],
        "16m",
        None,
    ),
    (
        "ApplianceMemoryNearShedding",
        [
            (f"lmx_system_memory_percent{{{LBL}}}", "90x40"),
            (f"lmx_shedding_memory_percent{{{LBL}}}", "92x40"),
        ],
        "6m",
        {},
    ),
    (
        "ApplianceMemoryNearShedding",
        [
            (f"lmx_system_memory_percent{{{LBL}}}", "70x40"),
            (f"lmx_shedding_memory_percent{{{LBL}}}", "92x40"),
        ],
        "6m",
        None,
    ),
    (
        "ApplianceShedding",
        [(f'lmx_rejected_requests_total{{{LBL}, reason="shed"}}', "0+1x40")],
        "5m",
        {},
    ),
    ("ApplianceSafeMode", [(f"lmx_safe_mode{{{LBL}}}", "1x20")], "2m", {}),
    ("ApplianceSafeMode", [(f"lmx_safe_mode{{{LBL}}}", "0x20")], "2m", None),
    (
        "ApplianceMaintenanceTaskFailing",
        [(f'lmx_maintenance_task_failures_total{{{LBL}, task="cache_trim"}}', "0+1x80")],
        "10m",
        {"task": "cache_trim"},
    ),
    (
        "ApplianceMaintenanceTaskFailing",
        [(f'lmx_maintenance_task_failures_total{{{LBL}, task="cache_trim"}}', "0 1 1x80")],
        "10m",
        None,
    ),
    (
        "ApplianceHelperCircuitOpen",
        [(f'lmx_helper_circuit_open{{{LBL}, helper="embedding"}}', "1x20")],
        "3m",
        {"helper": "embedding"},
    ),
]


def test_every_alert_has_a_firing_case() -> None:
    fired = {name for name, _, _, labels in CASES if labels is not None}
    assert fired == {r["alert"] for r in alert_rules()}


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests on the committed expressions (annotations left out: they are
    text for people, and their templates are checked by `check rules`)."""
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    severity = {}
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
            severity[r["alert"]] = r["labels"]["severity"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = []
    for name, series, at, labels in CASES:
        exp = (
            []
            if labels is None
            else [{"exp_labels": {**BASE, **labels, "severity": severity[name]}}]
        )
        tests.append(
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp}],
            }
        )
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": tests})
    )
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- the metric names, against a real appliance


def test_dashboard_is_the_rendered_one() -> None:
    assert json.loads(GRAFANA.read_text()) == dashboard()


def test_dashboard_has_the_panels_and_the_model_variable() -> None:
    dash = json.loads(GRAFANA.read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "model"} <= names
    titles = " | ".join(p["title"] for p in dash["panels"])
    for want in (
        "Request rate",
        "Rejections by reason",
        "Time to first token",
        "Inter-token",
        "End-to-end",
        "Tokens per second",
        "Running / waiting / limits",
        "Memory",
        "Models loaded",
        "Safe mode",
        "Maintenance task",
        "Event loop lag",
    ):
        assert want in titles, want
    per_model = [
        t["expr"]
        for p in dash["panels"]
        for t in p.get("targets", [])
        if "time_to_first_token" in t["expr"]
    ]
    assert per_model and all('model=~"$model"' in e for e in per_model)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_used_is_exported(module_appliance: Any) -> None:
    url = module_appliance.url
    # Histograms and per-model counters get children only after a request.
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    text = httpx.get(url + "/metrics", timeout=10).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    used = used_metric_names()
    assert used["alerts.yml"] and used["appliance.json"]
    missing = {
        src: sorted(n for n in names if not exported(families, n)) for src, names in used.items()
    }
    assert missing == {"alerts.yml": [], "appliance.json": []}, (
        f"metrics used but not exported: {missing}"
    )
