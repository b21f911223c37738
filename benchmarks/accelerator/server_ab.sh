#!/usr/bin/env bash
# Servers in turn on one machine, each loaded by load_metrics.py at the given concurrencies, the
# variants interleaved for ROUNDS rounds; a ceiling worker (BatchGenerator alone) before and
# after. Usage, on the accelerator machine after the recipe:
#   bash benchmarks/accelerator/server_ab.sh OUT.txt "1 32 64" 3 ROUNDS "LABEL|LAUNCH|OVERRIDES" ...
# LAUNCH is the command that starts the appliance ("-" for python3 -m appliance), OVERRIDES
# extra Hydra overrides (may be empty). Lines are appended to OUT.txt as each run ends.
set -u
OUTF=$1; CONCURRENCY=$2; REQUESTS=$3; ROUNDS=$4; shift 4
M=${M:-$HOME/.cache/appliance/models/demo-llama-1b-v1}
[ -d "$M" ] || python3 -m appliance.engine.demo --shape llama-1b > /dev/null 2>&1
L="-m benchmarks.accelerator.load_metrics http://127.0.0.1:18500"
ceiling() {
  local cs; cs=$(echo "$CONCURRENCY" | tr ' ' ',')
  (echo "$CONCURRENCY" | tr ' ' '\n'; echo quit) | timeout 200 python3 -m benchmarks \
    --ceiling-worker --model-path "$M" --concurrency "$cs" --max-tokens 128 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    d=json.loads(l)
    if "tokens_per_s" in d: print("ceiling c=%d %.0f tok/s ttft %.0f ms" % (d["concurrency"], d["tokens_per_s"], 1000*d["ttft_s"]))' >> "$OUTF"
}
ceiling
for ((r = 1; r <= ROUNDS; r++)); do
  for V in "$@"; do
    IFS='|' read -r LABEL LAUNCH OVR <<< "$V"
    [ "$LAUNCH" = "-" ] && LAUNCH="python3 -m appliance"
    # shellcheck disable=SC2086
    $LAUNCH ++server.port=18500 ++logging.file=none ++limits.max_running=64 \
      ++limits.max_queued=256 "++models.catalog.demo.path=$M" ++models.catalog.demo.max_tokens=512 \
      ++models.catalog.demo.context_length=2048 ++models.catalog.demo.completion_batch_size=64 \
      ++models.default=demo "++models.auto_load=[demo]" ++rate_limits.inference=null $OVR \
      > "${OUTF%.txt}.$LABEL.r$r.log" 2>&1 &
    SP=$!
    for _ in $(seq 1 180); do
      [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' localhost:18500/readyz)" = 200 ] && break
      kill -0 $SP 2>/dev/null || break
      sleep 0.5
    done
    timeout 60 python3 $L 8 1 > /dev/null  # warm-up
    for C in $CONCURRENCY; do
      echo "$LABEL r$r $(timeout 120 python3 $L "$C" "$REQUESTS" 2>&1 | tail -1)" >> "$OUTF"
    done
    kill $SP; for _ in $(seq 1 20); do kill -0 $SP 2>/dev/null || break; sleep 0.25; done
    kill -9 $SP 2>/dev/null; wait $SP 2>/dev/null
  done
done
ceiling
