#!/usr/bin/env bash
# Interleaved A/B of models.catalog.NAME.engine_process on one machine (BENCHMARKS.md, "The engine
# in a process of its own"): six servers in turn, engine process on / off, each loaded by
# load_metrics.py at the given concurrencies. Usage, on the accelerator machine after the recipe:
#   bash benchmarks/accelerator/engine_process_ab.sh "32 64" 3 > ab.txt
# KEY=fast_joins (any boolean catalog key) turns that key on and off instead.
set -u
KEY=${KEY:-engine_process}
CONCURRENCY=${1:-"32 64"}
REQUESTS=${2:-3}
M=${M:-$HOME/.cache/appliance/models/demo-llama-1b-v1}
[ -d "$M" ] || python3 -m appliance.engine.demo --shape llama-1b > /dev/null 2>&1
L="-m benchmarks.accelerator.load_metrics http://127.0.0.1:18500"
for MODE in true false true false true false; do
  python3 -m appliance ++server.port=18500 ++logging.file=none ++limits.max_running=64 \
    ++limits.max_queued=256 "++models.catalog.demo.path=$M" ++models.catalog.demo.max_tokens=512 \
    ++models.catalog.demo.context_length=2048 ++models.catalog.demo.completion_batch_size=64 \
    ++models.catalog.demo.$KEY=$MODE \
    ++models.default=demo "++models.auto_load=[demo]" ++rate_limits.inference=null > /dev/null 2>&1 &
  SP=$!
  for _ in $(seq 1 120); do
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' localhost:18500/readyz)" = 200 ] && break
    sleep 0.5
  done
  timeout 60 python3 $L 8 1 > /dev/null  # warm-up
  for C in $CONCURRENCY; do
    echo "$KEY=$MODE $(timeout 120 python3 $L "$C" "$REQUESTS" 2>&1)"
  done
  kill $SP; sleep 3; kill -9 $SP 2>/dev/null; wait $SP 2>/dev/null
done
