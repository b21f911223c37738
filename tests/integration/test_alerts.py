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


TESTS = PROM / "alerts.test.yml"


def alert_tests() -> list[tuple[str, bool]]:
    """(alert, fires) of every case in alerts.test.yml."""
    doc = yaml.safe_load(TESTS.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    return [
        (case["alertname"], bool(case["exp_alerts"]))
        for test in doc["tests"]
        for case in test["alert_rule_test"]
    ]


def test_every_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    names = {r["alert"] for r in alert_rules()}
    cases = alert_tests()
    assert {name for name, fires in cases if fires} == names
    assert {name for name, fires in cases if not fires} == names


@needs_promtool
def test_alerts_test_file_passes_promtool() -> None:
    """promtool's rule unit tests, the committed file on the committed rules (annotations
    included: their templates render the text the tests expect)."""
    out = subprocess.run(
        [PROMTOOL, "test", "rules", TESTS.name], cwd=PROM, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


@needs_promtool
def test_a_broken_rule_fails_its_test(tmp_path: Path) -> None:
    """The test file can fail: the safe-mode alert with a wrong threshold does not fire."""
    rules = (PROM / "alerts.yml").read_text().replace("lmx_safe_mode == 1", "lmx_safe_mode == 2")
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / TESTS.name).write_text(TESTS.read_text())
    out = subprocess.run(
        [PROMTOOL, "test", "rules", TESTS.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode != 0 and "ApplianceSafeMode" in out.stdout + out.stderr


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
