#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md, on a machine with one CUDA GPU and the package installed:
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]
#
# Writes one JSON file per row into OUT_DIR (default: $OUT when set, else benchmarks/results) and a
# log of the printed tables. Makes its own synthetic data (1280x1024 frames, packed for 224 and 299)
# under $WORK_DIR (default: a temporary folder); set PER_CLASS to change its size (frames per class).
set -euo pipefail

out_dir=${1:-${OUT:-benchmarks/results}}
work_dir=${WORK_DIR:-$(mktemp -d)}
per_class=${PER_CLASS:-8000}  # 24,000 frames: one epoch holds all warm-up and timed steps of 256 images
workers=${WORKERS:-$(( $(nproc) - 2 ))}  # DataLoader workers: every core but the training process's own
steps=${STEPS:-50}
warmup=${WARMUP:-15}
mkdir -p "$out_dir"
log="$out_dir/run_gpu.log"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$log" || true

if [ ! -f "$work_dir/shards224/index.json" ]; then
    python -m gastro_dist synth --out "$work_dir/src" --per-class "$per_class" --size-range 1280 1280 --seed 0
    for size in 224 299; do
        python -m gastro_dist pack "$work_dir/src" --out "$work_dir/shards$size" --input-size "$size" \
            --manifest "$work_dir/src/manifest.csv" --val-fraction 0.05 --shard-size 1000
    done
fi

train() {  # NAME MODEL BATCH SIZE [extra flags]: compute only and end to end from the shards
    local name=$1 model=$2 batch=$3 size=$4
    shift 4
    if ! python -m gastro_dist bench train --model "$model" --batch-size "$batch" --image-size "$size" \
            --precision bf16 --channels-last --steps "$steps" --warmup "$warmup" \
            --shards "$work_dir/shards$size" --workers "$workers" --json "$out_dir/$name.json" "$@" 2>&1 | tee -a "$log"
    then
        echo "row $name FAILED (see above); going on with the next" | tee -a "$log"
    fi
}

train resnet50-224-bf16-cl resnet50 256 224
train resnet50-224-bf16-cl-compile resnet50 256 224 --compile
train resnet50-224-bf16-cl-decode-on-device resnet50 256 224 --decode-on device
train vgg19-224-bf16-cl vgg19 128 224
train vgg19-224-bf16-cl-compile vgg19 128 224 --compile
train inception_v3-299-bf16-cl inception_v3 128 299
train inception_v3-299-bf16-cl-compile inception_v3 128 299 --compile

for size in 224 299; do
    python -m gastro_dist bench loader --shards "$work_dir/shards$size" --source "$work_dir/src" \
        --workers "$workers" --batches 40 --batch-size 128 --image-size "$size" \
        --json "$out_dir/loader-$size.json" 2>&1 | tee -a "$log"
done
python -m gastro_dist bench loader --shards "$work_dir/shards224" --workers "$workers" --batches 40 --batch-size 128 \
    --image-size 224 --decode-on device --json "$out_dir/loader-224-decode-on-device.json" 2>&1 | tee -a "$log"
echo "results in $out_dir"
