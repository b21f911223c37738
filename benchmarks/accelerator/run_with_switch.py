"""`python3 -m benchmarks.accelerator.run_with_switch SECONDS [appliance args...]`: the appliance with
sys.setswitchinterval(SECONDS) (Python's default is 0.005), for server_ab.sh's GIL variants."""

import runpy
import sys

sys.setswitchinterval(float(sys.argv[1]))
sys.argv = ["appliance", *sys.argv[2:]]
runpy.run_module("appliance", run_name="__main__", alter_sys=True)
