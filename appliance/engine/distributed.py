"""One model tensor-sharded across ranks with MLX's distributed backend.

Rank 0 is the whole appliance (HTTP, admission, metrics, state); its generation thread sends
each step's scheduling decisions (inserts, cancels, stop) to the other ranks, which apply the
same decisions to their own BatchGenerator and step in lock-step, as mlx_lm.server does.
Other ranks serve no HTTP. Ranks are started by `python -m appliance.launch`.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from typing import Any, Optional

log = logging.getLogger("appliance.distributed")

RANK_ENV = "APPLIANCE_RANK"
SIZE_ENV = "APPLIANCE_WORLD_SIZE"


def world() -> tuple[int, int]:
    """(rank, size) from the launcher's environment; (0, 1) when not distributed."""
    try:
        return int(os.environ.get(RANK_ENV, "0")), int(os.environ.get(SIZE_ENV, "1"))
    except ValueError:
        return 0, 1


_GROUP: Any = None


class GroupStatus:
    """What rank 0 knows of its group, for /admin/health and the metrics."""

    def __init__(self, backend: str) -> None:
        self.rank, self.size = world()
        self.backend = backend
        self.failed_rank_seen = False  # set when the launcher reports a dead rank

    @property
    def healthy_ranks(self) -> int:
        return 1 if self.failed_rank_seen else self.size

    def health(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "backend": self.backend,
            "rank": self.rank,
            "ranks_healthy": self.healthy_ranks,
            "state": "failed" if self.failed_rank_seen else "ok",
        }

    def reasons(self) -> Optional[tuple[str, str]]:
        if self.failed_rank_seen:
            return ("failing", "a rank of the distributed group died; the group is restarting")
        return None


def group(backend: str = "ring") -> Any:
    """The process's distributed group, initialised once (None when not distributed)."""
    global _GROUP
    if _GROUP is None and world()[1] > 1:
        import mlx.core as mx

        _GROUP = mx.distributed.init(backend=backend, strict=True)
        log.info("distributed group: rank %d of %d (%s)", _GROUP.rank(), _GROUP.size(), backend)
    return _GROUP


class Link:
    """Rank 0 sends a picklable object to every rank with two all_sums; the others receive it."""

    def __init__(self, grp: Any) -> None:
        self.group = grp
        self.rank = int(grp.rank())
        self.size = int(grp.size())

    def share(self, obj: Optional[Any]) -> Optional[Any]:
        mx: Any = importlib.import_module("mlx.core")

        g = self.group
        if self.rank == 0:
            if obj is None:
                mx.eval(mx.distributed.all_sum(mx.array(0), group=g))
                return None
            data = mx.array(memoryview(pickle.dumps(obj)), dtype=mx.uint8)
            mx.eval(mx.distributed.all_sum(mx.array(data.size), group=g))
            mx.eval(mx.distributed.all_sum(data, group=g))
            return obj
        size = int(mx.distributed.all_sum(mx.array(0), group=g).item())
        if size == 0:
            return None
        data = mx.distributed.all_sum(mx.zeros(size, dtype=mx.uint8), group=g)
        return pickle.loads(bytes(memoryview(data)))

    def sync_seed(self) -> None:
        """Every rank samples with the same random state."""
        mx: Any = importlib.import_module("mlx.core")

        seed = mx.distributed.all_sum(mx.random.state[0], group=self.group).view(mx.uint64)
        mx.random.seed(int(seed[0].item()))


def load_sharded(path: str) -> tuple[Any, Any]:
    """mlx-lm's sharded loading: tensor parallel across the group."""
    from mlx_lm.utils import sharded_load

    model, tokenizer = sharded_load(path)[:2]
    return model, tokenizer


def run_follower(models: Any) -> int:
    """The whole life of a rank other than 0: load its shard of models.default, then follow."""
    import asyncio

    from .loading import as_folder
    from .memory import prompt_cache_budget
    from .paths import resolve_path
    from .worker import ModelWorker, batching

    grp = group()
    name = models.default
    spec = models.catalog[name]
    path = str(as_folder(resolve_path(spec, models.builtin_dir), models.builtin_dir))
    worker = ModelWorker(
        name,
        spec.path,
        loader=lambda: load_sharded(path),
        loop=asyncio.new_event_loop(),  # never run: a follower hands nothing to a loop
        **batching(spec),
        # the same budget as rank 0's (its cache decisions must match): hosts of a group that
        # differ in memory need models.prompt_cache_bytes set
        prompt_cache_bytes=prompt_cache_budget(models.prompt_cache_bytes),
        prompt_cache_min_tokens=models.prompt_cache_min_tokens,
        unfused_attention_elements=models.cuda_unfused_attention_elements,
        decode_kernel=models.cuda_decode_kernel,
        link=Link(grp),
    )
    log.info("rank %d following rank 0 on model %s", grp.rank(), name)
    worker.follow()
    log.info("rank %d: rank 0 stopped the group", grp.rank())
    return 0
