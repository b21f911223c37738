"""Prometheus metrics on a registry the builder passes in (never the global REGISTRY).

Names follow vLLM's stems under `metrics.namespace`. Counters and histograms are updated by
the engine's observers; gauges that mirror live state are read at scrape time by a collector.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .config import MetricsConfig
from .engine.types import Generation

if TYPE_CHECKING:
    from .health import Vitals

REJECT_REASONS = (
    "busy",
    "rate_limited",
    "shed",
    "unauthorized",
    "forbidden_host",
    "too_large",
    "draining",
    "insufficient_memory",
    "safe_mode",
)

# Error codes (errors.py) of refusals raised outside the middleware (admission, the drain gate,
# a resource's own body check) -> rejected_requests_total reason. Keyed by code, never by text.
CODE_REASONS = {
    "server_busy": "busy",
    "draining": "draining",
    "rate_limited": "rate_limited",
    "overloaded": "shed",
    "invalid_api_key": "unauthorized",
    "admin_disabled": "unauthorized",
    "forbidden_host": "forbidden_host",
    "request_too_large": "too_large",
    "insufficient_memory": "insufficient_memory",
    "safe_mode": "safe_mode",
}
# The `api` label of requests_total, by route template: which front-end served the request.
API_OF_ROUTE = {
    "/v1/chat/completions": "openai_chat",
    "/v1/completions": "openai_completions",
    "/v1/embeddings": "openai_embeddings",
    "/v1/rerank": "rerank",
    "/v1/models": "openai_models",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
    "/v1/responses": "responses",
    "/v1/responses/{response_id}": "responses",
}
# Probes answer 503 while draining or loading: that is their job, not a refused request.
_NOT_COUNTED = ("/healthz", "/readyz")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LOOP_LAG = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LOOP_LAG_INTERVAL_S = 0.05
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LiveCollector(Collector):
    """Gauges read from live state at scrape time."""

    def __init__(self, prefix: str, read: Callable[[], Vitals]) -> None:
        self.prefix = prefix
        self.read = read

    def collect(self) -> Iterable[Any]:
        v = self.read()
        e, m, x = v.engine, v.memory, v.extra
        p = self.prefix

        def g(name: str, doc: str, value: Optional[float], unit: str = "") -> Any:
            fam = GaugeMetricFamily(p + name, doc, unit=unit)
            if value is not None:
                fam.add_metric([], float(value))
            return fam

        yield g("num_requests_running", "Requests in the generation batches.", e.running)
        yield g("num_requests_waiting", "Requests waiting in the admission queue.", e.waiting)
        yield g(
            "queued_requests",
            "Requests waiting in the admission queue (num_requests_waiting, by another name).",
            e.waiting,
        )
        yield g("concurrent_limit", "limits.max_running in force.", e.max_running)
        yield g("queue_limit", "limits.max_queued in force.", e.max_queued)
        yield g("models_loaded", "Models loaded and running.", len(e.models_loaded))
        yield g("generation_threads_alive", "Generation threads alive.", e.threads_alive)
        yield g(
            "safe_mode", "1 while the appliance runs in safe mode.", 1 if v.safe_mode_reason else 0
        )
        yield g("draining", "1 while the appliance drains before exit.", 1 if v.draining else 0)
        yield g("uptime_seconds", "Seconds since the process started.", v.uptime_s)
        for name, doc, key in (
            ("process_starts", "Process starts over the state file's life.", "process_starts"),
            (
                "unclean_starts",
                "Starts that followed an unclean exit (a crash or a kill), over the state "
                "file's life.",
                "unclean_starts",
            ),
        ):
            if key in x:
                starts = CounterMetricFamily(p + name, doc)
                starts.add_metric([], float(x[key]))
                yield starts
        mem = GaugeMetricFamily(p + "memory_bytes", "Memory in use by kind.", labels=["kind"])
        for kind in ("rss", "mlx_active", "mlx_peak", "mlx_cache"):
            value = getattr(m, kind)
            if value is not None:
                mem.add_metric([kind], float(value))
        yield mem
        yield g("system_memory_percent", "System memory in use, percent.", m.system_percent)
        yield g(
            "shedding_memory_percent",
            "shedding.memory_percent in force.",
            v.shedding_memory_percent,
        )
        pc = GaugeMetricFamily(
            p + "prompt_cache_bytes", "Bytes held by prompt caches.", labels=["model"]
        )
        for model, nbytes in e.prompt_cache_bytes.items():
            pc.add_metric([model], float(nbytes))
        yield pc
        yield g(
            "kv_reserved_bytes",
            "KV-cache bytes reserved by the requests holding slots ((prompt + max_tokens) "
            "tokens each).",
            e.kv_reserved_bytes,
        )
        evicted = CounterMetricFamily(
            p + "prompt_cache_evicted_bytes",
            "Prompt-cache bytes evicted to make room for requests or a model load.",
        )
        evicted.add_metric([], float(e.kv_evicted_bytes))
        yield evicted
        joins = CounterMetricFamily(
            p + "batch_joins", "Times waiting requests joined the running batch.", labels=["model"]
        )
        joined = CounterMetricFamily(
            p + "batch_joined_requests",
            "Requests that joined the batch; divided by batch_joins, the mean prefilled together.",
            labels=["model"],
        )
        for model, (n_joins, n_joined) in e.batch_joins.items():
            joins.add_metric([model], float(n_joins))
            joined.add_metric([model], float(n_joined))
        yield joins
        yield joined
        disk_hits = CounterMetricFamily(
            p + "prefix_cache_disk_hits",
            "Prompt tokens served from the prompt cache's disk tier (counted in "
            "prefix_cache_hits too).",
            labels=["model"],
        )
        disk_bytes = GaugeMetricFamily(
            p + "prompt_cache_disk_bytes",
            "Bytes of the prompt cache's files on disk.",
            labels=["model"],
        )
        for model, (tokens, nbytes) in e.prompt_cache_disk.items():
            disk_hits.add_metric([model], float(tokens))
            disk_bytes.add_metric([model], float(nbytes))
        yield disk_hits
        yield disk_bytes
        for name, doc, key in (
            ("helper_up", "1 when the helper node answers.", "helper_up"),
            ("helper_circuit_open", "1 while the helper's circuit breaker is open.", "helper_open"),
        ):
            fam = GaugeMetricFamily(p + name, doc, labels=["helper"])
            for helper, value in x.get(key, {}).items():
                fam.add_metric([helper], float(value))
            yield fam
        if "group_size" in x:
            yield g("distributed_group_size", "Ranks in the distributed group.", x["group_size"])
            yield g(
                "distributed_ranks_healthy",
                "Ranks of the group known to be alive.",
                x["group_healthy"],
            )
        info = InfoMetricFamily(p + "build", "Version and backend of this appliance.")
        info.add_metric([], {"version": v.version, "backend": v.backend})
        yield info


class Metrics:
    """Every appliance series; `render()` gives the Prometheus text."""

    def __init__(self, cfg: MetricsConfig, registry: Optional[CollectorRegistry] = None) -> None:
        # No *_created series: they double the scrape and no dashboard reads them. The switch
        # is process-wide, which is fine: the appliance is one process.
        disable_created_metrics()
        self.cfg = cfg
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.prefix = cfg.namespace + "_" if cfg.namespace else ""
        p, r = self.prefix, self.registry
        self.requests = Counter(
            p + "requests",
            "Finished requests, by front-end (api), model, route and status.",
            ["api", "model", "endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            p + "generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Time between tokens.",
            ["model"],
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Request latency, admission to end.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "request_queue_time_seconds",
            "Time waiting for a slot.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.rejected = Counter(
            p + "rejected_requests", "Requests refused, by reason.", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.cache_hits = Counter(
            p + "prompt_cache_hits", "Requests that reused a cached prefix.", ["model"], registry=r
        )
        self.cache_misses = Counter(
            p + "prompt_cache_misses", "Requests with no cached prefix.", ["model"], registry=r
        )
        # vLLM's names and units: tokens looked up in the prefix cache, and tokens found there
        self.prefix_queries = Counter(
            p + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            ["model"],
            registry=r,
        )
        self.prefix_hits = Counter(
            p + "prefix_cache_hits",
            "Prompt tokens served from the prefix cache (not prefilled).",
            ["model"],
            registry=r,
        )
        self.model_load = Histogram(
            p + "model_load_seconds",
            "Time to load a model.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.task_runs = Counter(
            p + "maintenance_task_runs", "Maintenance task runs.", ["task"], registry=r
        )
        self.task_failures = Counter(
            p + "maintenance_task_failures",
            "Maintenance task runs that failed.",
            ["task"],
            registry=r,
        )
        self.task_duration = Histogram(
            p + "maintenance_task_duration_seconds",
            "Maintenance task run time.",
            ["task"],
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.loop_lag = Histogram(
            p + "event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LOOP_LAG_INTERVAL_S} s: its own busy "
            "stretches plus waits for the GIL the generation threads hold.",
            buckets=_LOOP_LAG,
            registry=r,
        )
        self.helper_requests = Counter(
            p + "helper_requests",
            "Requests proxied to helper nodes.",
            ["helper", "status"],
            registry=r,
        )

    async def watch_loop_lag(self, interval: float = LOOP_LAG_INTERVAL_S) -> None:
        """Until cancelled: sleep `interval`, observe how much later than that the loop woke.
        Every callback the loop runs (stream chunks, request parsing) waits that long too."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - t - interval))

    def watch(self, read: Callable[[], Vitals]) -> None:
        """Read live gauges from `read` at every scrape."""
        self.registry.register(_LiveCollector(self.prefix, read))

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def on_response(self, req: Any, resp: Any, endpoint: str) -> None:
        """Count one finished request: requests_total for /v1, and refusals not yet counted.

        `endpoint` is the route's path, or "other" for a path no route serves (so a scan of
        random paths cannot grow the label set).
        """
        ctx = req.context
        code = getattr(ctx, "error_code", None)
        if (
            code in CODE_REASONS
            and not getattr(ctx, "rejected", None)
            and req.path not in _NOT_COUNTED
        ):
            ctx.rejected = CODE_REASONS[code]
            self.reject(CODE_REASONS[code])
        if req.path.startswith("/v1/"):
            model = getattr(ctx, "model", None) or ""
            api = API_OF_ROUTE.get(endpoint, "other")
            self.requests.labels(api, model, endpoint, str(resp.status_code)).inc()

    # -- engine observers
    def on_request(self, event: str, gen: Optional[Generation], details: dict[str, Any]) -> None:
        if event == "admitted" and gen is not None:
            self.queue_time.labels(gen.model).observe(details.get("queued_s", 0.0))
        elif event == "finished" and gen is not None:
            m = gen.model
            (self.cache_hits if gen.cached_tokens else self.cache_misses).labels(m).inc()
            self.prefix_queries.labels(m).inc(len(gen.prompt_tokens))
            self.prefix_hits.labels(m).inc(gen.cached_tokens)
            self.prompt_tokens.labels(m).inc(len(gen.prompt_tokens))
            self.generation_tokens.labels(m).inc(len(gen.tokens))
            if gen.t_first is not None:
                self.ttft.labels(m).observe(gen.t_first - gen.t_admitted)
            if gen.itl:
                h = self.itl.labels(m)
                for v in gen.itl:
                    h.observe(v)
            self.e2e.labels(m).observe(time.perf_counter() - gen.t_created)

    def on_model(self, event: str, model: str, details: dict[str, Any]) -> None:
        if event == "loaded":
            self.model_load.labels(model).observe(details.get("seconds", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """Falcon middleware (outermost): hands every finished request to `Metrics.on_response`."""

    def __init__(self, metrics: Metrics, app: Any) -> None:
        self.metrics = metrics
        self.app = app

    def _endpoint(self, req: Any) -> str:
        if req.uri_template:
            return str(req.uri_template)
        # Routing runs after process_request, so a request refused by middleware has no
        # uri_template yet: ask the router (the compiled router's find is cheap).
        found = self.app._router.find(req.path)
        return str(found[3]) if found else "other"

    async def process_response(self, req: Any, resp: Any, resource: Any, ok: bool) -> None:
        endpoint = self._endpoint(req) if req.path.startswith("/v1/") else ""
        self.metrics.on_response(req, resp, endpoint)
