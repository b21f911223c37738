"""Run the appliance from a composed config: validate, record the start, build, serve, exit.

A bad profile or override exits CONFIG_ERROR (2) with one line naming the key, the value and
what is allowed, so a supervisor can tell a config error from a crash.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn, Optional

from omegaconf import DictConfig, OmegaConf

from . import exits
from .config import AppConfig, ConfigError, load, safe_mode_overlay
from .state import StateStore

if TYPE_CHECKING:
    from .engine.cpu import BlasChoice

log = logging.getLogger("appliance")


def fail(exc: ConfigError) -> NoReturn:
    print(str(exc), file=sys.stderr)
    sys.exit(exits.CONFIG_ERROR)


def prepare_process() -> None:
    """What must happen before MLX or transformers are imported, once per process."""
    from .engine.mlx_ext import cuda, transformers_imports

    transformers_imports.install()  # transformers' import table, kept between starts
    cuda.mlx_env_defaults()  # before MLX builds its CUDA caches


def arrange_blas(typed: AppConfig) -> BlasChoice:
    """On Linux with MLX on the CPU, run with the BLAS engine.cpu_blas asks for: this may
    execute the process again, with the same argv and environment plus LD_PRELOAD, before MLX
    computes anything (see engine/cpu.py)."""
    from .engine import cpu

    return cpu.arrange(typed.engine.cpu_blas, typed.engine.cpu_gemv_forward)


def main(composed: DictConfig) -> NoReturn:
    """Validate, decide safe mode (a crash loop), build, serve until drained, exit."""
    prepare_process()
    from . import logs

    try:
        typed = load(composed)
    except ConfigError as exc:
        fail(exc)
    blas = arrange_blas(typed)
    from .engine import distributed

    rank, _ = distributed.world()
    if rank > 0:
        # Other ranks serve no HTTP and keep no state: they follow rank 0's batch.
        typed.logging.file = "none"
        logs.setup(typed.logging)
        log.log(logging.WARNING if blas.slow else logging.INFO, "%s", blas.line())
        sys.exit(distributed.run_follower(typed.models))
    logs.setup(typed.logging)
    log.log(logging.WARNING if blas.slow else logging.INFO, "%s", blas.line())
    # Checked at every start, so a broken safe-mode profile is found before a crash loop needs it.
    safe = safe_mode_config(composed)
    state, reason = start_state(typed)
    from .builder import build
    from .server import serve

    code = exits.OK
    try:
        serve(build(typed, state=state, safe_mode_reason=reason, safe=safe))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else exits.ENGINE_GAVE_UP
    # Leave without running native destructors: MLX's CUDA backend aborts in them at interpreter
    # exit ("terminate called without an active exception"), which would turn a clean drain
    # into exit 134. Everything worth keeping (state, logs) is written by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_state(typed: AppConfig) -> tuple[StateStore, Optional[str]]:
    """Record this start in the state file. Returns the state and why safe mode is on (a crash
    loop), or None. Safe mode runs the normal config: the builder holds the loads and puts the
    safe-mode profile's limits in force until safe mode ends."""
    state = StateStore(typed.state)
    boot = state.begin_run(typed.models.catalog)
    if boot.safe_mode_reason:
        log.error(
            "starting in safe mode (no auto-load, no recovery, no load on demand; the "
            "safe-mode profile's limits) until POST /admin/safe-mode/exit or %g s of stable "
            "running: %s",
            typed.state.stable_after_s,
            boot.safe_mode_reason,
        )
    return state, boot.safe_mode_reason


def safe_mode_config(composed: DictConfig) -> AppConfig:
    """The safe-mode profile's file merged over the composed config, validated."""
    try:
        merged = OmegaConf.merge(composed, safe_mode_overlay())
        assert isinstance(merged, DictConfig)
        return load(merged)
    except ConfigError as exc:
        fail(exc)
