#!/usr/bin/env bash
# py-spy on a running appliance while closed-loop streaming clients load it (the device has no
# other profiler): per-thread samples, then GIL-holding samples, as raw collapsed stacks.
#
#   bash benchmarks/accelerator/profile_server.sh MODEL_DIR OUT_DIR [CLIENTS] [SECONDS]
set -u
M=$1
O=$2
C=${3:-64}
S=${4:-8}
PORT=18500
python3 -m appliance ++server.port=$PORT ++server.host=127.0.0.1 ++logging.file=none \
  ++limits.max_running=$C ++limits.max_queued=$((4 * C)) ++rate_limits.inference=null \
  "++models.catalog.demo.path=$M" ++models.catalog.demo.max_tokens=256 \
  ++models.catalog.demo.completion_batch_size=$C ++models.default=demo ++models.auto_load=[demo] > "$O/server.log" 2>&1 &
SP=$!
for _ in $(seq 1 240); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/readyz)" = 200 ] && break
  sleep 0.5
done
python3 -m benchmarks.accelerator.load_metrics http://127.0.0.1:$PORT "$C" 1 > /dev/null 2>&1  # warm-up
python3 -m benchmarks.accelerator.load_metrics http://127.0.0.1:$PORT "$C" 40 > "$O/load.txt" 2>&1 &
LP=$!
sleep 3
py-spy record -p $SP -o "$O/threads.txt" -f raw -d "$S" -r 200 --threads > "$O/pyspy.log" 2>&1
py-spy record -p $SP -o "$O/gil.txt" -f raw -d "$S" -r 200 --threads --gil >> "$O/pyspy.log" 2>&1
kill $LP 2> /dev/null
kill $SP
wait $SP
