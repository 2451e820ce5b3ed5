#!/usr/bin/env bash
# The whole pipeline on the embedded synthetic dataset, end to end:
#   synth -> pack -> verify -> train (both phases) -> evaluate (report)
#   bash launch/demo.sh [OUT_DIR]        (default: runs/demo)
# On a CPU-only machine it trains configs/smoke.yaml (resnet18 at 64 px, a few minutes);
# with a GPU it trains configs/resnet50.yaml at 224 px on every GPU of the node
# (ImageNet weights when resnet50-11ad3fa6.pth is in the torch hub cache, else from scratch).
# Set PER_CLASS to change the dataset size (default 200 images per class).
set -euo pipefail
out=${1:-runs/demo}
per_class=${PER_CLASS:-200}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$out"

num_gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$num_gpus" -ge 1 ]; then
  config="$repo/configs/resnet50.yaml" input_size=224 size_range="640 1280"
  overrides=(tracking.tracker=none)
  python - <<'PY' || overrides+=(model.pretrained=none)
from gastro_dist.models.backbones import resolve_weights_path
resolve_weights_path("resnet50", "imagenet")
PY
  launcher=(accelerate launch --config_file "$repo/accelerate_config.yaml" --num_processes "$num_gpus" -m gastro_dist)
else
  config="$repo/configs/smoke.yaml" input_size=64 size_range="320 480"
  overrides=()
  launcher=(python -m gastro_dist)
fi

[ -f "$out/images/manifest.csv" ] || gastro-dist synth --out "$out/images" --per-class "$per_class" --size-range $size_range --seed 0
[ -f "$out/shards/index.json" ] || gastro-dist pack "$out/images" --manifest "$out/images/manifest.csv" --out "$out/shards" \
  --val-fraction 0.15 --test-per-class $((per_class / 5)) --input-size "$input_size" --seed 0
gastro-dist verify "$out/shards"
"${launcher[@]}" train --config "$config" --shards "$out/shards" --out "$out/run" ${overrides[@]+"${overrides[@]}"}
gastro-dist evaluate --run "$out/run" --shards "$out/shards" --split test --out "$out/eval" --cam 2
echo "run: $out/run   report: $out/eval/report.md"
