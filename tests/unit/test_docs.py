"""docs/: configuration.md and conf/config.yaml match the schema, operations.md has a runbook
for every alert and names only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from appliance.config import reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: str) -> set[str]:
    return {_slug(m.group(2)) for m in re.finditer(r"^(#+)\s+(.+)$", md, re.M)}


def test_base_yaml_and_reference_are_rendered_from_the_schema() -> None:
    for path, text in reference.outputs(ROOT).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run `python -m appliance.config.reference --write`"
        )


def test_base_yaml_holds_exactly_the_schema_defaults() -> None:
    """Loading the base YAML alone gives the schema's defaults: it is not a second source."""
    from appliance.config import AppConfig, compose, load

    assert load(compose([])) == AppConfig()


def test_every_key_is_documented_with_default_and_range() -> None:
    keys = {k.path: k for k in reference.keys()}
    assert {
        "server.port",
        "limits.max_running",
        "models.catalog.<name>.max_tokens",
        "service.caffeinate",
        "state.crash_loop.starts",
    } <= set(keys)
    assert keys["server.port"].default == 8080
    assert keys["server.port"].allowed.startswith("1..65535")
    assert keys["limits.max_running"].allowed == ">= 1 requests"
    assert keys["shedding.memory_percent"].default == 95.0
    assert "lan | public" in keys["security.exposure"].allowed
    assert "catalog name" in keys["models.default"].allowed
    undocumented = [k.path for k in keys.values() if not k.help]
    assert not undocumented, undocumented


def test_every_alert_has_a_runbook() -> None:
    rules = yaml.safe_load((ROOT / "recipes" / "prometheus" / "alerts.yml").read_text())
    ops = (DOCS / "operations.md").read_text(encoding="utf-8")
    anchors = _anchors(ops)
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            url = rule["annotations"]["runbook_url"]
            assert url == f"docs/operations.md#{name.lower()}", url
            assert name.lower() in anchors, f"no runbook section '### {name}' in operations.md"
            section = ops.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
            assert len(section.split()) > 30, f"the runbook of {name} is too short"


def test_operations_covers_the_topics() -> None:
    anchors = _anchors((DOCS / "operations.md").read_text(encoding="utf-8"))
    assert {
        "install-as-a-service",
        "macos-launchd",
        "linux-systemd",
        "monitor",
        "prometheus",
        "grafana",
        "safe-mode",
        "runbooks",
    } <= anchors


def test_paths_named_in_the_docs_exist() -> None:
    for doc in (DOCS / "operations.md", DOCS / "configuration.md", ROOT / "recipes" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for rel in set(re.findall(r"`((?:recipes|docs|conf|appliance)/[\w./-]+\.\w+)`", text)):
            if "NAME" not in rel:  # a placeholder
                assert (ROOT / rel).exists(), f"{doc.name} names {rel}, which does not exist"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).exists(), f"{doc.name} links to {link}"
