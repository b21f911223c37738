"""The Grafana dashboard in recipes/grafana/appliance.json, built here so that panel positions,
ids and queries stay consistent (`python -m appliance.recipes render` writes it).

Every query filters on the `instance` variable; per-model series also on `model`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
INST = 'instance=~"$instance"'
MODEL = 'instance=~"$instance", model=~"$model"'
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate(lmx_{metric}_bucket{{{MODEL}}}[{RATE}])))",
            name,
        )
        for name, q in QUANTILES
    ]


class _Layout:
    """Places panels left to right in rows of 24 grid units; ids in order."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def add(
        self,
        kind: str,
        title: str,
        queries: list[tuple[str, str]],
        *,
        unit: str = "short",
        w: int = 8,
        h: int = 8,
        description: str = "",
        mappings: Optional[list[dict[str, Any]]] = None,
        thresholds: Optional[list[tuple[Optional[float], str]]] = None,
    ) -> None:
        steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
        defaults: dict[str, Any] = {
            "unit": unit,
            "thresholds": {"mode": "absolute", "steps": steps},
        }
        if mappings:
            defaults["mappings"] = mappings
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [
                _target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)
            ],
        }
        if kind == "timeseries":
            panel["options"] = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "none"},
            }
        else:
            panel["options"] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "auto",
            }
        self.panels.append(panel)


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as a dict (Grafana 10+ JSON model)."""
    lay = _Layout()
    lay.row("Traffic")
    lay.add(
        "timeseries",
        "Request rate by status",
        [(f"sum by (status) (rate(lmx_requests_total{{{MODEL}}}[{RATE}]))", "{{status}}")],
        unit="reqps",
        description="Finished /v1 requests per second, by HTTP status.",
    )
    lay.add(
        "timeseries",
        "Request rate by API",
        [(f"sum by (api) (rate(lmx_requests_total{{{MODEL}}}[{RATE}]))", "{{api}}")],
        unit="reqps",
        description="Finished /v1 requests per second, by front-end: openai_chat, "
        "openai_completions, anthropic, responses, ...",
    )
    lay.add(
        "timeseries",
        "Rejections by reason",
        [(f"sum by (reason) (rate(lmx_rejected_requests_total{{{INST}}}[{RATE}]))", "{{reason}}")],
        unit="reqps",
        description="Requests refused before the engine: busy (429), shed / draining (503), ...",
    )
    lay.add(
        "timeseries",
        "Tokens per second",
        [
            (f"sum(rate(lmx_generation_tokens_total{{{MODEL}}}[{RATE}]))", "generated"),
            (f"sum(rate(lmx_prompt_tokens_total{{{MODEL}}}[{RATE}]))", "prompt"),
        ],
        unit="short",
        description="Generated and prompt tokens per second.",
    )
    lay.row("Latency")
    for metric, title in (
        ("time_to_first_token_seconds", "Time to first token"),
        ("inter_token_latency_seconds", "Inter-token latency"),
        ("e2e_request_latency_seconds", "End-to-end latency"),
    ):
        lay.add("timeseries", f"{title} p50 / p95 / p99", _quantiles(metric), unit="s")
    lay.add(
        "timeseries",
        "Queue time p50 / p95 / p99",
        _quantiles("request_queue_time_seconds"),
        unit="s",
        w=12,
        description="Time requests waited for a batch slot.",
    )
    lay.add(
        "timeseries",
        "Prompt cache hit ratio",
        [
            (
                f"sum(rate(lmx_prompt_cache_hits_total{{{MODEL}}}[{RATE}])) / "
                f"(sum(rate(lmx_prompt_cache_hits_total{{{MODEL}}}[{RATE}])) + "
                f"sum(rate(lmx_prompt_cache_misses_total{{{MODEL}}}[{RATE}])))",
                "requests with a hit",
            ),
            (
                f"sum(rate(lmx_prefix_cache_hits_total{{{MODEL}}}[{RATE}])) / "
                f"sum(rate(lmx_prefix_cache_queries_total{{{MODEL}}}[{RATE}]))",
                "prompt tokens from the cache",
            ),
        ],
        unit="percentunit",
        w=12,
        description="Share of requests that reused a cached prefix, and of prompt tokens "
        "served from the cache rather than prefilled.",
    )
    lay.add(
        "timeseries",
        "Requests prefilled together",
        [
            (
                f"sum(rate(lmx_batch_joined_requests_total{{{MODEL}}}[{RATE}])) / "
                f"sum(rate(lmx_batch_joins_total{{{MODEL}}}[{RATE}]))",
                "requests per join",
            )
        ],
        w=12,
        description=(
            "How many new requests join the running batch at once (one prefill call). Near 1 "
            "under load: each arrival costs a prefill of its own; see join_window_s."
        ),
    )
    lay.row("Capacity")
    lay.add(
        "timeseries",
        "Running / waiting / limits",
        [
            (f"sum(lmx_num_requests_running{{{INST}}})", "running"),
            (f"sum(lmx_num_requests_waiting{{{INST}}})", "waiting"),
            (f"sum(lmx_concurrent_limit{{{INST}}})", "running limit"),
            (f"sum(lmx_queue_limit{{{INST}}})", "queue limit"),
        ],
        w=12,
        description="Batch slots in use and the admission queue, against their limits.",
    )
    lay.add(
        "timeseries",
        "Memory",
        [
            (f'lmx_memory_bytes{{{INST}, kind="rss"}}', "RSS {{instance}}"),
            (f'lmx_memory_bytes{{{INST}, kind="mlx_active"}}', "MLX active {{instance}}"),
            (f'lmx_memory_bytes{{{INST}, kind="mlx_cache"}}', "MLX cache {{instance}}"),
            (f"sum by (instance) (lmx_prompt_cache_bytes{{{INST}}})", "prompt caches {{instance}}"),
        ],
        unit="bytes",
        w=12,
    )
    lay.add(
        "timeseries",
        "System memory in use",
        [(f"lmx_system_memory_percent{{{INST}}}", "{{instance}}")],
        unit="percent",
        w=12,
        description="Inference is shed (503) at shedding.memory_percent (95 base, 92 mono512).",
        thresholds=[(None, "green"), (85.0, "orange"), (92.0, "red")],
    )
    up_down = [
        {
            "type": "value",
            "options": {
                "0": {"text": "off", "color": "green"},
                "1": {"text": "ON", "color": "red"},
            },
        }
    ]
    lay.add(
        "stat",
        "Models loaded",
        [(f"sum(lmx_models_loaded{{{INST}}})", "loaded")],
        w=4,
        thresholds=[(None, "red"), (1.0, "green")],
    )
    lay.add(
        "stat",
        "Safe mode",
        [(f"max(lmx_safe_mode{{{INST}}})", "safe mode")],
        w=4,
        mappings=up_down,
        thresholds=[(None, "green"), (1.0, "red")],
    )
    lay.add(
        "stat",
        "Draining",
        [(f"max(lmx_draining{{{INST}}})", "draining")],
        w=4,
        mappings=up_down,
        thresholds=[(None, "green"), (1.0, "orange")],
    )
    lay.add(
        "stat",
        "Uptime",
        [(f"min(lmx_uptime_seconds{{{INST}}})", "uptime")],
        unit="s",
        w=4,
        thresholds=[(None, "orange"), (300.0, "green")],
    )
    lay.add(
        "stat",
        "Generation threads alive",
        [(f"sum(lmx_generation_threads_alive{{{INST}}})", "threads")],
        w=4,
    )
    lay.add(
        "stat",
        "Helpers with circuit open",
        [(f"sum(lmx_helper_circuit_open{{{INST}}}) or vector(0)", "open")],
        w=4,
        thresholds=[(None, "green"), (1.0, "red")],
    )
    lay.row("Health")
    lay.add(
        "timeseries",
        "Maintenance task runs and failures",
        [
            (
                f"sum by (task) (rate(lmx_maintenance_task_runs_total{{{INST}}}[{RATE}]))",
                "{{task}} runs",
            ),
            (
                f"sum by (task) (rate(lmx_maintenance_task_failures_total{{{INST}}}[{RATE}]))",
                "{{task}} failures",
            ),
        ],
        unit="ops",
    )
    lay.add(
        "timeseries",
        "Maintenance task duration p95",
        [
            (
                f"histogram_quantile(0.95, sum by (le, task) "
                f"(rate(lmx_maintenance_task_duration_seconds_bucket{{{INST}}}[{RATE}])))",
                "{{task}}",
            )
        ],
        unit="s",
    )
    lay.add(
        "timeseries",
        "Event loop lag p50 / p99",
        [
            (
                f"histogram_quantile({q}, sum by (le) "
                f"(rate(lmx_event_loop_lag_seconds_bucket{{{INST}}}[{RATE}])))",
                name,
            )
            for name, q in (("p50", 0.5), ("p99", 0.99))
        ],
        unit="s",
        description=(
            "How late the server's event loop ran a timer due every 50 ms. Every stream chunk and "
            "request waits that long too; a p99 that climbs with load means the server's own "
            "Python (or the GIL its generation threads hold) delays the streams."
        ),
    )
    lay.add(
        "timeseries",
        "Helpers",
        [
            (f"lmx_helper_up{{{INST}}}", "{{helper}} up"),
            (f"lmx_helper_circuit_open{{{INST}}}", "{{helper}} circuit open"),
        ],
    )
    return {
        "uid": "lmx-appliance",
        "title": "Appliance",
        "description": "The LLM serving appliance: traffic, latency, capacity, memory, health.",
        "tags": ["appliance", "mlx", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable("instance", "Instance", "label_values(lmx_build_info, instance)"),
                _variable(
                    "model",
                    "Model",
                    'label_values(lmx_generation_tokens_total{instance=~"$instance"}, model)',
                ),
            ]
        },
        "panels": lay.panels,
    }


def render_dashboard() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a dashboard: panel targets and query variables."""
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
    return out
