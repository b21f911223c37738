"""docs/: profiles.md matches the schemas, operations.md has a runbook for every alert and names
only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from appliance import docgen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: str) -> set[str]:
    return {_slug(m.group(2)) for m in re.finditer(r"^(#+)\s+(.+)$", md, re.M)}


def test_profiles_doc_matches_the_schemas() -> None:
    committed = (DOCS / "profiles.md").read_text(encoding="utf-8")
    assert committed == docgen.render_profiles_doc(), (
        "docs/profiles.md is stale: run "
        "`python -m appliance.recipes profiles-doc --out docs/profiles.md`"
    )


def test_every_key_is_documented_with_default_and_range() -> None:
    keys = docgen.keys()
    paths = {k.path for k in keys}
    assert {"server.port", "limits.max_running", "models.catalog.<name>.max_tokens",
            "service.caffeinate", "state.crash_loop.starts"} <= paths
    by_path = {k.path: k for k in keys}
    assert by_path["server.port"].default == 8080
    assert by_path["server.port"].allowed == "1..65535"
    assert by_path["limits.max_running"].allowed == ">= 1"
    assert by_path["shedding.memory_percent"].default == 95.0
    assert "lan | public" in by_path["security.exposure"].allowed
    # The ranges come from validate() itself: every rule key it checks is a documented key
    # (or a section whose keys carry the rule).
    for rule in docgen.recorded_rules():
        assert rule in paths or any(p.startswith(rule + ".") for p in paths), rule


def test_descriptions_name_real_keys() -> None:
    paths = {k.path for k in docgen.keys()}
    assert set(docgen.DESCRIPTIONS) <= paths, set(docgen.DESCRIPTIONS) - paths


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
    assert {"install-as-a-service", "macos-launchd", "linux-systemd", "monitor", "prometheus",
            "grafana", "safe-mode", "runbooks"} <= anchors


def test_paths_named_in_the_docs_exist() -> None:
    for doc in (DOCS / "operations.md", DOCS / "profiles.md", ROOT / "recipes" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for rel in set(re.findall(r"`((?:recipes|docs|conf|appliance)/[\w./-]+\.\w+)`", text)):
            if "NAME" not in rel:  # a placeholder
                assert (ROOT / rel).exists(), f"{doc.name} names {rel}, which does not exist"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).exists(), f"{doc.name} links to {link}"
