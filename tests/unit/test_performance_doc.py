"""docs/performance.md names only what exists, and its tables agree with the files its charts
are drawn from; the README links only inside the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "performance.md"
# Each machine class's section, and the result file its table and chart come from.
SECTIONS = {
    "2-core x86-64 CPU, MLX CPU backend": "cpu-2core.json",
    "NVIDIA H200": "nvidia-h200.json",
}


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


@pytest.mark.parametrize("doc", [DOC, ROOT / "README.md"], ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#:]+)(?:#([^)]*))?\)", text):
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name} links to {target}"
        if anchor:
            headings = re.findall(r"^#+\s+(.+)$", path.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no #{anchor} in {target}"


def test_named_modules_and_scripts_exist() -> None:
    text = DOC.read_text(encoding="utf-8")
    modules = set(re.findall(r"python3? -m ((?:benchmarks|appliance)[\w.]*)", text))
    assert "benchmarks.steptrace" in modules
    for mod in modules:
        base = ROOT / mod.replace(".", "/")
        assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), mod
    for rel in re.findall(r"(benchmarks/accelerator/\w+\.sh)", text):
        assert (ROOT / rel).is_file(), rel
    # Scripts named bare: after a command ("`step_by_batch ...`, `solo_ab`") and in the last
    # column of the table of defaults ("`decode_modes`, `server_ab.sh`").
    closer = text.split("## Looking closer\n", 1)[1]
    names = set(re.findall(r"`, `(\w+)` \|", closer))
    for line in closer.splitlines():
        if line.startswith("| `") and line.count("|") == 4:
            names |= set(re.findall(r"`([\w.]+)`", line.rsplit("|", 2)[1]))
    assert {"solo_ab", "decode_modes", "server_ab.sh", "steptrace"} <= names
    for name in names:
        path = (
            ROOT / "benchmarks" / f"{name}.py"
            if name == "steptrace"
            else ROOT / "benchmarks" / "accelerator" / (name if "." in name else f"{name}.py")
        )
        assert path.is_file(), name


def _table_after(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows if row[0].strip().isdigit()]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.parametrize("heading", sorted(SECTIONS))
def test_tables_match_their_figure_files(heading: str) -> None:
    res = json.loads((DOC.parent / "performance" / SECTIONS[heading]).read_text())
    rows = _table_after(DOC.read_text(encoding="utf-8"), heading)
    assert [int(r[0]) for r in rows] == res["plan"]["concurrency"]
    for row in rows:
        c = row[0]
        ceiling = res["ceiling"]["best"][c]
        mlx, app = res["servers"]["mlx_lm.server"][c], res["servers"]["appliance"][c]
        assert _number(row[1]) == round(ceiling["tokens_per_s"], 1)
        assert _number(row[2]) == round(mlx["tokens_per_s"], 1)
        assert _number(row[3]) == round(app["tokens_per_s"], 1)
        assert row[4] == f"{app['tokens_per_s'] / mlx['tokens_per_s']:.2f}x"
        assert row[5] == f"{app['tokens_per_s'] / ceiling['tokens_per_s']:.2f}x"
        assert row[6] == f"{app['tokens_per_s'] / ceiling['tokens_per_s_median']:.2f}x"


def test_the_smollm2_cpu_table_is_the_benchs_own_from_its_figure_file() -> None:
    """The cpu-real table is what the bench prints from the JSON beside it, row for row."""
    from benchmarks.cpu_real import table

    res = json.loads((DOC.parent / "performance" / "cpu-real-2core.json").read_text())
    section = DOC.read_text(encoding="utf-8").split("### 2-core x86-64 CPU, SmolLM2\n", 1)[1]
    documented = [line for line in section.split("\n#", 1)[0].splitlines() if line.startswith("|")]
    printed = [line for line in table(res["cpu_real"]).splitlines() if line.startswith("|")]
    assert documented == printed
    assert all(t["passed"] for t in res["targets"])


def test_the_cpu_choices_table_is_the_best_of_its_runs() -> None:
    """Each row of "What each choice gives" is its combination's best figures in the JSON."""
    res = json.loads((DOC.parent / "performance" / "cpu-step-2core.json").read_text())
    section = DOC.read_text(encoding="utf-8").split("### What each choice gives\n", 1)[1]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.split("\n#", 1)[0].splitlines()
        if line.startswith("| `")
    ]
    assert len(rows) == len(res["combinations"]) == 5
    for row, combo in zip(rows, res["combinations"], strict=True):
        args, runs = combo["args"], combo["runs"]
        assert row[0].startswith(f"`{args[args.index('--blas') + 1]}`")
        assert f"(`{args[args.index('--weights') + 1]}`)" in row[1]
        gemv = "-" if args[1] == "bundled" else ("off" if "--no-gemv-forward" in args else "on")
        assert row[2] == gemv
        step = min(r["step_ms"]["least"] for r in runs)
        assert row[3:] == [
            f"{max(r['prefill_tok_s'] for r in runs):.1f}",
            f"{step:.1f}",
            f"{1000 / step:.1f}",
            f"{min(r['products_alone_ms']['least'] for r in runs):.1f}",
            str(len(runs)),
        ]
    assert "PLACEHOLDER" not in DOC.read_text(encoding="utf-8")
