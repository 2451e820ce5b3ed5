#!/usr/bin/env bash
# One process (the GPU if there is one, else the CPU), small batches, a few steps per epoch,
# no tracker: for checking data, config and code before a real run.
#   launch/debug.sh --config configs/resnet50.yaml --shards SHARDS --out /tmp/debug-run [key=value ...]
# Your key=value overrides come after the debug settings below, so they win.
set -euo pipefail
options=() overrides=()
for arg in "$@"; do
  if [[ "$arg" != -* && "$arg" == *=* ]]; then overrides+=("$arg"); else options+=("$arg"); fi
done
exec python -m gastro_dist train "${options[@]}" \
  data.batch_size=8 data.eval_batch_size=16 data.num_workers=0 \
  head.epochs=1 finetune.epochs=1 max_steps_per_epoch=5 tracking.tracker=none \
  ${overrides[@]+"${overrides[@]}"}
