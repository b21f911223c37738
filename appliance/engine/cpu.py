"""The CPU backend's speed: which BLAS MLX multiplies with, and how weights are held there.

On Linux the `mlx[cpu]` wheel links the reference BLAS, some 50x slower than OpenBLAS at prefill
sizes. `arrange(setting)` (engine.cpu_blas) runs once at start, before MLX computes anything:
with `auto` it looks for an optimized BLAS with the standard CBLAS symbols (Debian and Ubuntu's
OpenBLAS, see `CANDIDATES`), with a path it takes that library, and then the process executes
itself again (same argv, same environment) with the library in LD_PRELOAD, so MLX's `cblas_*`
calls resolve to it. In front of it goes a small library of the appliance's own, compiled once
with the system C compiler (data/gemv_forward.c): it sends one-row products, all a decode step
of one sequence does, to the BLAS's gemv instead of its gemm. `bundled` keeps the wheel's BLAS.
Engine processes and distributed ranks inherit the environment.

MLX's CPU kernels for quantized weights do not use BLAS at all (on x86 they run at about one
multiply-add a nanosecond), so with an optimized BLAS dense float32 weights are faster both for
prefill and decode: `plan_weights` decides per model (models.catalog.NAME.cpu_weights) and
`to_cpu_compute` applies the plan after loading.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("appliance.engine")

MARKER_ENV = "APPLIANCE_CPU_BLAS"  # set by arrange() for the process it executes again
PRELOAD_ENV = "LD_PRELOAD"
BLAS_SETTINGS = ("auto", "bundled")  # or the absolute path of a BLAS library
INSTALL_HINT = "apt-get install libopenblas0-pthread"


def _triplet() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(
        machine, f"{machine}-linux-gnu"
    )


def candidates() -> list[Path]:
    """Where `auto` looks, in order: Debian and Ubuntu's OpenBLAS (libopenblas0-pthread, then
    libopenblas0-openmp), then a plain libopenblas.so.0 (other distributions)."""
    lib = Path("/usr/lib") / _triplet()
    return [
        lib / "openblas-pthread" / "libblas.so.3",
        lib / "openblas-openmp" / "libblas.so.3",
        lib / "libopenblas.so.0",
        Path("/usr/lib64/libopenblas.so.0"),
        Path("/usr/lib/libopenblas.so.0"),
    ]


def blas_problem(path: str | Path) -> Optional[str]:
    """Why `path` is not a BLAS the appliance can preload (None when it is): it must be a
    shared library for this machine exporting cblas_sgemm and cblas_sgemv."""
    p = Path(path)
    if not p.is_absolute():
        return f"{path} is not an absolute path"
    if any(c in str(p) for c in " :"):
        return f"{path} has a space or colon, which LD_PRELOAD cannot hold"
    if not p.is_file():
        return f"{path} does not exist"
    try:
        lib = ctypes.CDLL(str(p))  # RTLD_LOCAL: nothing already loaded binds to it
    except OSError as exc:
        return f"{path} is not a shared library this process can load ({exc})"
    missing = [s for s in ("cblas_sgemm", "cblas_sgemv") if not hasattr(lib, s)]
    if missing:
        return f"{path} does not export {', '.join(missing)}"
    return None


def find_blas(setting: str) -> tuple[Optional[str], str]:
    """(the library to preload or None, why) for engine.cpu_blas = `setting`."""
    if setting == "bundled":
        return None, "engine.cpu_blas=bundled keeps the mlx wheel's own BLAS"
    if setting != "auto":
        problem = blas_problem(setting)
        if problem:
            return None, f"engine.cpu_blas names a library that cannot be used: {problem}"
        return setting, "engine.cpu_blas names it"
    for path in candidates():
        if path.is_file() and blas_problem(path) is None:
            return str(path), "engine.cpu_blas=auto found it"
    return None, (
        "engine.cpu_blas=auto found no optimized BLAS (looked for OpenBLAS: "
        f"{INSTALL_HINT}); the mlx wheel's reference BLAS is slow"
    )


def shim_source() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "gemv_forward.c"


def _native_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_path("appliance")) / "native"


def gemv_shim(folder: Optional[Path] = None) -> tuple[Optional[str], str]:
    """(the gemv-forwarding library, compiled once into the user cache, or None; why)."""
    src = shim_source()
    try:
        code = src.read_bytes()
    except OSError as exc:
        return None, f"its source is missing ({exc})"
    digest = hashlib.sha256(code + platform.machine().encode()).hexdigest()[:16]
    try:
        folder = folder or _native_dir()
    except Exception as exc:  # no home or cache folder to be found
        return None, f"no cache folder for it ({exc})"
    out = folder / f"gemv-forward-{digest}.so"
    if any(c in str(out) for c in " :"):  # LD_PRELOAD splits at spaces and colons
        return None, f"its cache path {out} has a space or colon, which LD_PRELOAD cannot hold"
    if out.is_file():
        return str(out), "compiled earlier"
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) to build it"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / out.name
            r = subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(src), "-ldl"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode != 0:
                return None, f"{cc} failed: {(r.stderr or r.stdout).strip()[:300]}"
            os.replace(built, out)  # atomic: a concurrent start finds a whole file or none
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"it could not be built: {exc}"
    return str(out), f"compiled with {cc}"


def mlx_on_cpu() -> bool:
    """Whether MLX computes on the CPU here (Linux with the cpu backend, or no GPU)."""
    if not sys.platform.startswith("linux"):
        return False  # macOS: Metal, and Accelerate's BLAS for the CPU
    try:
        import mlx.core as mx

        return bool(mx.default_device() == mx.cpu)
    except Exception:  # no MLX backend installed
        return False


def started_as_appliance() -> bool:
    """Whether this process is `python -m appliance` or the `appliance` script: only then does
    executing `sys.orig_argv` again start the same thing."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "appliance.__main__":
        return True
    cli = getattr(main, "cli", None)
    return getattr(cli, "__module__", None) == "appliance.__main__"


@dataclass(frozen=True)
class BlasChoice:
    """The BLAS MLX's CPU backend uses in this process, and why."""

    setting: str  # engine.cpu_blas
    library: Optional[str]  # the optimized BLAS preloaded; None: the wheel's own (or not on CPU)
    gemv_forward: Optional[str]  # the gemv-forwarding library preloaded in front of it
    reason: str
    on_cpu: bool = True  # MLX computes on the CPU here (else the BLAS hardly matters)

    @property
    def slow(self) -> bool:
        """MLX computes on the CPU with the wheel's reference BLAS though it was not asked to."""
        return self.on_cpu and self.library is None and self.setting != "bundled"

    def line(self) -> str:
        if self.library is None:
            return f"CPU BLAS: the mlx wheel's own ({self.reason})"
        fwd = (
            "one-row products through its gemv"
            if self.gemv_forward
            else "no gemv forwarding for one-row products"
        )
        return f"CPU BLAS: {self.library}, preloaded; {fwd} ({self.reason})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mapped(path: str) -> bool:
    """Whether the shared library at `path` is mapped into this process."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith(real) for line in f)
    except OSError:
        return False


def _split(preload: str) -> list[str]:
    return [p for p in preload.replace(":", " ").split() if p]


def current(setting: Optional[str] = None) -> BlasChoice:
    """What this process has, read from the marker arrange() left and the libraries mapped."""
    raw = os.environ.get(MARKER_ENV)
    if raw:
        try:
            mark = json.loads(raw)
            lib, shim = mark.get("library"), mark.get("gemv_forward")
            if lib and not mapped(lib):
                return BlasChoice(
                    mark.get("setting", "auto"),
                    None,
                    None,
                    f"{lib} was to be preloaded but is not loaded (see the loader's message)",
                )
            if shim and not mapped(shim):
                shim = None
            return BlasChoice(
                mark.get("setting", "auto"),
                lib,
                shim,
                mark.get("reason", ""),
                bool(mark.get("on_cpu", True)),
            )
        except (ValueError, AttributeError):
            pass
    for lib in _split(os.environ.get(PRELOAD_ENV, "")):
        if mapped(lib) and blas_problem(lib) is None:
            return BlasChoice(setting or "auto", lib, None, "preloaded by the environment")
    return BlasChoice(setting or "bundled", None, None, "not arranged in this process")


def _preload_env(choice: BlasChoice, env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    ours = [p for p in (choice.gemv_forward, choice.library) if p]
    old = _split(env.get(PRELOAD_ENV, ""))
    previous = json.loads(env.get(MARKER_ENV) or "{}")
    drop = {previous.get("library"), previous.get("gemv_forward")}  # an earlier arrange()'s
    rest = [p for p in old if p not in drop and p not in ours]
    if ours or rest:
        env[PRELOAD_ENV] = " ".join([*ours, *rest])
    else:
        env.pop(PRELOAD_ENV, None)
    env[MARKER_ENV] = json.dumps(choice.as_dict())
    return env


def choose(setting: str, gemv_forward: bool = True) -> BlasChoice:
    """The BLAS this process should run with (no side effects beyond compiling the shim)."""
    if not mlx_on_cpu():
        return BlasChoice(setting, None, None, "MLX does not compute on the CPU here", False)
    library, reason = find_blas(setting)
    shim = None
    if library is not None and gemv_forward:
        shim, why = gemv_shim()
        if shim is None:
            reason += f"; no gemv forwarding: {why}"
    return BlasChoice(setting, library, shim, reason)


def preload_env(
    setting: str = "auto", gemv_forward: bool = True, env: Optional[dict[str, str]] = None
) -> dict[str, str]:
    """The environment (`env`, else this process's) that a process started as the appliance
    with these settings runs under after arrange(): for a benchmark's own workers."""
    return _preload_env(choose(setting, gemv_forward), dict(os.environ if env is None else env))


def arrange(setting: str, gemv_forward: bool = True) -> BlasChoice:
    """Run with the BLAS engine.cpu_blas asks for: returns what this process has, after
    executing itself again with LD_PRELOAD set when that is needed (once: a marker in the
    environment says it was done)."""
    raw = os.environ.get(MARKER_ENV)
    if raw:
        try:
            mark = json.loads(raw)
        except ValueError:
            mark = {}
        if mark.get("setting") == setting and bool(mark.get("gemv_forward")) <= gemv_forward:
            return current(setting)
    want = choose(setting, gemv_forward)
    env = _preload_env(want, dict(os.environ))
    same = env.get(PRELOAD_ENV, "") == os.environ.get(PRELOAD_ENV, "")
    own = started_as_appliance()
    if same:  # nothing to load or unload: no need to start again
        if own:  # for engine processes; a host process (pytest) keeps its environment
            os.environ[MARKER_ENV] = env[MARKER_ENV]
        return want if want.library is None else current(setting)
    if not own:
        have = current(setting)
        if have.library is not None:
            return have
        return BlasChoice(
            setting,
            None,
            None,
            f"not preloaded: this process was not started as the appliance ({want.reason})",
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except (OSError, ValueError) as exc:  # the process goes on as it is, on the wheel's BLAS
        return BlasChoice(
            setting, None, None, f"not preloaded: executing the process again failed ({exc})"
        )
    raise AssertionError("unreachable")  # pragma: no cover


def optimized_blas() -> Optional[str]:
    """The optimized BLAS this process multiplies with, or None (the wheel's own)."""
    return current().library


# -- weights on the CPU

CPU_WEIGHTS = ("auto", "dense", "quantized")
DENSE_SHARE = 0.25  # auto: dense float32 weights take at most this share of system memory


@dataclass(frozen=True)
class WeightSizes:
    """A model's weight bytes as it would be held three ways."""

    native: int  # as loaded on a GPU: floats in their own (16-bit) dtype, packed weights packed
    float32: int  # floats in float32, packed weights packed (the CPU backend, as stored)
    dense: int  # every weight dense in float32
    quantized: bool  # whether any weight is packed


@dataclass(frozen=True)
class WeightPlan:
    """How a model's weights are held: floats in float32 on the CPU, quantized layers dense."""

    float32: bool
    dense: bool
    reason: str

    def bytes(self, sizes: WeightSizes) -> int:
        if self.dense:
            return sizes.dense
        return sizes.float32 if self.float32 else sizes.native

    def summary(self) -> str:
        if not self.float32:
            return f"as stored ({self.reason})"
        kind = "dense float32" if self.dense else "float32, quantized layers as stored"
        return f"{kind} ({self.reason})"


def plan_weights(
    mode: str, sizes: WeightSizes, *, on_cpu: Optional[bool] = None, total_memory: int = 0
) -> WeightPlan:
    """How to hold a model's weights (models.catalog.NAME.cpu_weights = `mode`). On the CPU
    backend floats compute in float32 (float16 is many times slower there); quantized layers
    become dense float32 with `dense`, or with `auto` when an optimized BLAS is in use (MLX's
    quantized CPU kernels do not use it) and the dense weights take at most DENSE_SHARE of
    memory. GPUs keep the weights as stored."""
    if on_cpu is None:
        on_cpu = mlx_on_cpu()
    if not on_cpu:
        return WeightPlan(False, False, "MLX does not compute on the CPU")
    if not sizes.quantized:
        return WeightPlan(True, False, "no quantized layers")
    if mode == "dense":
        return WeightPlan(True, True, "cpu_weights=dense")
    if mode == "quantized":
        return WeightPlan(True, False, "cpu_weights=quantized")
    blas = optimized_blas()
    if blas is None:
        return WeightPlan(
            True, False, "cpu_weights=auto: no optimized BLAS, dense would be no faster"
        )
    if not total_memory:
        import psutil

        total_memory = int(psutil.virtual_memory().total)
    if sizes.dense > DENSE_SHARE * total_memory:
        return WeightPlan(
            True,
            False,
            f"cpu_weights=auto: dense weights ({sizes.dense / 2**30:.1f} GiB) would take more "
            f"than {DENSE_SHARE:.0%} of memory",
        )
    return WeightPlan(True, True, "cpu_weights=auto: an optimized BLAS is in use")


def to_cpu_compute(model: Any, plan: WeightPlan) -> Any:
    """The model with `plan` applied (floats to float32, then quantized layers dequantized),
    evaluated. On the model's own thread."""
    if not plan.float32:
        return model
    import mlx.core as mx

    def other_float(dtype: Any) -> bool:  # a cast to the same dtype would copy the array
        return bool(mx.issubdtype(dtype, mx.floating)) and dtype != mx.float32

    model.set_dtype(mx.float32, other_float)  # scales first: dequantizing then rounds nothing
    if plan.dense:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        model.set_dtype(mx.float32, other_float)
    mx.eval(model.parameters())
    return model
