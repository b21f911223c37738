#!/usr/bin/env bash
# The engine alone (benchmarks.steptrace), models.catalog.demo.fast_joins on and off in turn:
# 64 closed-loop clients coming back spread 0-60 ms, 3 requests each, ROUNDS rounds a process.
#
#   bash benchmarks/accelerator/fast_joins_ab.sh MODEL_DIR OUT_DIR [ROUNDS] [PAIRS]
#
# Appends one line per round to OUT_DIR/steptrace.txt as each process ends.
set -u
M=$1
O=$2
R=${3:-3}
P=${4:-2}
for _ in $(seq "$P"); do
  for mode in true false; do
    python3 -m benchmarks.steptrace --model-path "$M" --clients 64 --requests 3 --max-tokens 128 \
      --return-delay-ms 60 --rounds "$R" "++models.catalog.demo.fast_joins=$mode" \
      >> "$O/steptrace.txt" 2>> "$O/steptrace.err"
  done
done
