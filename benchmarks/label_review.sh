#!/usr/bin/env bash
# The README's label-review figures ("Label review"): the demo's 600 synthetic frames with labels flipped on
# purpose (5% uniform; 10% gastric cancer <-> ulcer), cv + label-issues (precision, recall), then train on the
# pack as flipped, with the flagged list decided by an always-right reviewer, and with every flip corrected,
# each scored on its test split against the true labels. About 40 minutes on 2 CPU cores.
#
#   bash benchmarks/label_review.sh WORK_DIR
set -euo pipefail
work=$(realpath -m "${1:?usage: bash benchmarks/label_review.sh WORK_DIR}")
repo=$(cd "$(dirname "$0")/.." && pwd)
bench=(python "$repo/benchmarks/label_review.py")
images=$work/images
mkdir -p "$work"
[ -f "$images/manifest.csv" ] || gastro-dist synth --out "$images" --per-class 200 --size-range 320 480 --seed 0 >/dev/null
for case in "u5 0.05 uniform" "c10 0.05 pairs"; do   # pairs: 2 x 0.05 = 10% of cancer and ulcer frames
    read -r name rate mode <<<"$case"
    out=$work/$name
    "${bench[@]}" flip "$images" "$rate" "$mode" "$out"
    # found: out-of-fold predictions from cv, then label-issues
    gastro-dist pack "$images" --manifest "$out/manifest.csv" --out "$out/shards" --folds 3 --test-per-class 30 \
        --input-size 64 --workers 2 >"$out/pack.log" 2>&1
    gastro-dist cv --config "$repo/configs/smoke.yaml" --shards "$out/shards" --out "$out/cv" tracking.tracker=none >"$out/cv.log" 2>&1
    gastro-dist label-issues --cv "$out/cv" --out "$out/review" >"$out/label-issues.log" 2>&1
    "${bench[@]}" score "$out"
    # worth: the same frames trained as flipped, after the review of the flagged list, after every correction
    "${bench[@]}" decide "$images" "$out" all
    "${bench[@]}" decide "$images" "$out" flagged
    for condition in flipped flagged all; do
        relabel=()
        [ "$condition" != flipped ] && relabel=(--relabel "$out/decisions-$condition.csv")
        gastro-dist pack "$images" --manifest "$out/manifest.csv" --out "$out/pack-$condition" --val-fraction 0.15 \
            --test-per-class 40 --input-size 64 --seed 0 --workers 2 "${relabel[@]}" >"$out/pack-$condition.log" 2>&1
        gastro-dist train --config "$repo/configs/smoke.yaml" --shards "$out/pack-$condition" --out "$out/run-$condition" \
            tracking.tracker=none >"$out/train-$condition.log" 2>&1
        gastro-dist evaluate --run "$out/run-$condition" --shards "$out/pack-$condition" --split test \
            --out "$out/run-$condition/test" --bootstrap 20 >"$out/evaluate-$condition.log" 2>&1
        "${bench[@]}" accuracy "$out" "$out/run-$condition/test/predictions.csv"
    done
done
