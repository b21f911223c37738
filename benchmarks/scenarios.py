"""What a bench run measures: the servers compared, the prompts, the plan and the targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

APPLIANCE = "appliance"
MLX_SERVER = "mlx_lm.server"
SERVERS = (MLX_SERVER, APPLIANCE)

# Short, different chat prompts; client i sends PROMPTS[(i + j * c) % len] as its j-th request,
# with a request number in front (see prompt_text).
PROMPTS = (
    "Write a short note about the sea.",
    "Describe a quiet morning in a small town.",
    "List three uses for a paper clip.",
    "Explain how a bicycle stays upright.",
    "Tell a story about a lost key.",
    "What makes bread rise?",
    "Give advice to a new gardener.",
    "Summarise the water cycle.",
    "Describe the sound of rain on a roof.",
    "Why do cats purr?",
    "Plan a picnic for four people.",
    "Explain what a map legend is.",
    "Write a haiku about winter light.",
    "How does a lighthouse work?",
    "Describe an old library.",
    "What is a good name for a boat?",
)


def prompt_text(i: int, n: int) -> str:
    """The i-th fixed prompt, made unique by a leading request number: no server skips the
    prefill of a repeated prompt through its prompt cache (the ceiling has none)."""
    return f"Request {n}. {PROMPTS[i % len(PROMPTS)]}"


@dataclass(frozen=True)
class TargetSet:
    """Throughput and latency targets: {concurrency: ratio}."""

    vs_mlx: dict[int, float]
    vs_ceiling: float
    ttft_p99_vs_mlx: dict[int, float]
    zero_errors_at: tuple[int, ...] = ()


# The demo model on a CPU; the 1B Llama shape on an accelerator (`--targets` chooses).
CPU_TARGETS = TargetSet(vs_mlx={1: 1.5, 8: 1.15}, vs_ceiling=0.8, ttft_p99_vs_mlx={8: 0.7})
ACCEL_TARGETS = TargetSet(
    vs_mlx={1: 2.0, 32: 2.0}, vs_ceiling=0.8, ttft_p99_vs_mlx={32: 0.5}, zero_errors_at=(64,)
)
CEILING_TRIES = 3  # ceiling batches per repetition and concurrency (they are short)
BUSY_P99_S = 0.050
METRICS_SCRAPE_S = 0.020
COLD_START_S = 3.0


@dataclass
class Plan:
    """What one bench run does, from the command line."""

    model_path: Path
    model_label: str
    concurrency: list[int]
    max_tokens: int
    requests_per_client: int
    repeat: int
    out: Path
    costs: bool
    chart: bool
    metrics_requests: int
    busy_requests: int
    cold_starts: int
    targets: str
    timeout_s: float
    probe_interval_s: float
    appliance_args: list[str] = field(default_factory=list)
    mlx_server_args: list[str] = field(default_factory=list)
    clients_per_process: int = 16
    second_ceiling: bool = True
    # A run sends at least this many requests: at low concurrency each client sends more than
    # requests_per_client (on one H200 a one-client run of 3 requests, 1.4 s, gave 1.50x
    # mlx_lm.server, and runs of 6 requests minutes later 1.98x and 2.05x).
    min_requests: int = 8
    # What runs: "serving" (the three side by side) and/or "cpu-real" (SmolLM2 on the CPU).
    scenarios: tuple[str, ...] = ("serving",)
    cpu_repeat: int = 3
    cpu_decode_tokens: int = 64
    llama_python: Optional[str] = None  # a Python with llama_cpp, for the cpu-real peer

    @property
    def cmax(self) -> int:
        return max(self.concurrency)

    def per_client(self, c: int) -> int:
        """Requests each of c clients sends in a run: requests_per_client, or more so that the
        run sends at least min_requests."""
        return max(self.requests_per_client, -(-self.min_requests // c))
