#!/usr/bin/env bash
# Train on every GPU of this node with DDP:
#   launch/train.sh --config configs/resnet50.yaml --shards SHARDS --out RUN [key=value ...]
# Wraps `accelerate launch --config_file accelerate_config.yaml -m gastro_dist train "$@"`
# with --num_processes set to the number of visible GPUs. Several nodes: see slurm/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
num_gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$num_gpus" -lt 1 ]; then
  echo "launch/train.sh: no GPU visible; use launch/debug.sh for a one-process CPU run" >&2
  exit 2
fi
# A mistake in the config, shards, weights or run folder ends here: one line, exit 2, no launcher traceback.
python -m gastro_dist train --check --processes "$num_gpus" "$@"
exec accelerate launch --config_file "$repo/accelerate_config.yaml" --num_processes "$num_gpus" \
  -m gastro_dist train "$@"
