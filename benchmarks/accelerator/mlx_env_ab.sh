#!/usr/bin/env bash
# The engine alone (benchmarks.steptrace) at 1 client and at 64 clients coming back spread 0-60 ms,
# under MLX CUDA settings given one per argument ("-" for MLX's defaults), each run twice in
# turn (forward, then backward order).
#
#   bash benchmarks/accelerator/mlx_env_ab.sh MODEL_DIR OUT_DIR "-" "MLX_MAX_OPS_PER_BUFFER=100" ...
#
# Appends "# SETTINGS" and then steptrace's lines to OUT_DIR/env_ab.txt as each process ends.
set -u
M=$1
O=$2
shift 2
run() {
  local settings=$1
  local envs=()
  [ "$settings" != "-" ] && read -r -a envs <<< "$settings"
  for c in 1 64; do
    echo "# $settings c=$c" >> "$O/env_ab.txt"
    env "${envs[@]}" python3 -m benchmarks.steptrace --model-path "$M" --clients "$c" --requests 3 \
      --max-tokens 128 --return-delay-ms 60 --rounds 2 >> "$O/env_ab.txt" 2>> "$O/env_ab.err"
  done
}
for s in "$@"; do run "$s"; done
for ((i = $#; i >= 1; i--)); do run "${!i}"; done
