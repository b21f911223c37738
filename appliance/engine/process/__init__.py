"""A model's generation thread in an engine process of its own (`engine_process: true`).

The child runs the same `ModelWorker` loop; the server keeps the tokenizer, admission, HTTP and
metrics. What it buys is isolation: a hard crash of MLX (an abort in a backend, a segfault, the
kernel's out-of-memory kill) ends only the engine process, its requests get an engine_failure
error, and the model is reloaded as after a dead generation thread, where in the server's own
process the same crash would end the server. It was built to take the generation thread's
Python off the event loop's GIL; on an H100 at 32 and 64 streaming clients, interleaved runs
gave the same tokens/s either way (benchmarks/accelerator/server_ab.sh), so it is off by
default. Not for a distributed group (rank 0 keeps its thread).

The two talk over a socket pair with `multiprocessing.connection` framing (pickles):

- server -> engine: the commands of `engine.commands` (Submit, Cancel, Call, Fault, Stop), as
  a generation thread's inbox takes them.
- engine -> server: ("loaded", info) or ("load_failed", error) once; then ("step", events) once
  per decode step, ("fail", rids, error), ("result", cid, ok, value), ("stats", ...) at most
  every STATS_S, ("log", level, logger, message, exception) and ("died", reason).

The child ignores SIGINT and SIGTERM (the server drains first, then sends Stop) and exits when
the socket closes, so it never outlives the server.
"""

from .client import AnyWorker, ProcessWorker

__all__ = ["AnyWorker", "ProcessWorker"]
