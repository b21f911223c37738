"""`python3 -m benchmarks.accelerator.run_with_loop asyncio [appliance args...]`: the appliance on
asyncio's own event loop instead of uvloop (which takes the GIL back for every libuv callback),
for server_ab.sh's variants."""

import runpy
import sys

import appliance.server as server

_has = server._has
if sys.argv[1] == "asyncio":
    server._has = lambda module: module != "uvloop" and _has(module)  # type: ignore[assignment]
sys.argv = ["appliance", *sys.argv[2:]]
runpy.run_module("appliance", run_name="__main__", alter_sys=True)
