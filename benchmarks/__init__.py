"""The appliance's benchmarks: `python -m benchmarks` (`make bench`) runs the appliance side by side
with mlx_lm.server and the bare engine; `benchmarks.steptrace` and `benchmarks.accelerator` are
diagnostics. Not part of the installed package: run them from a checkout."""
