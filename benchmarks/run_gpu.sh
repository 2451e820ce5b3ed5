#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md, on a machine with one CUDA GPU.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]                                       # the full table: a long lease
#   bash benchmarks/run_gpu.sh --quick [OUT_DIR] [--device cuda|cpu] [--tiny]  # the GPU proof: 8 minutes
#
# OUT_DIR defaults to $OUT when set, else benchmarks/results. Both modes first install the wheels of
# $WHEELHOUSE (default .wheelhouse, made by benchmarks/wheelhouse.sh) that this Python lacks, with
# `pip install --no-index`, into its environment when that is writable, else into $WHEELHOUSE_TARGET
# (default /tmp/site) put on PYTHONPATH. The code that runs is always this working tree (PYTHONPATH).
# PYTHON picks the interpreter (default python3); WORK_DIR holds the synthetic data (default: a
# temporary folder; data already there is reused).
#
# Full mode: 24,000 synthetic 1280x1024 frames packed for 224 and 299 px (PER_CLASS, default 8000),
# every model compute-only and end to end, compiled and not, and the input pipeline; one JSON per row
# and run_gpu.log in OUT_DIR. Making that data alone takes most of a 15-minute lease: use --quick there.
#
# --quick: a small synthetic set made at the size pack stores (short side 256 for 224 px input), then
# these rows, in this order, each guarded (a failing or hanging row never stops the next) and each
# writing its result the moment it ends:
#   pytest-gpu                              pytest -m gpu (tests/test_gpu.py and the other gpu tests)
#   resnet50-224-bf16-cl                    ResNet50 224, bf16, channels_last: compute only (MFU, peak
#                                           memory) and end to end from the shards (workers decode)
#   resnet50-224-bf16-cl-decode-on-device   the same with --decode-on device (nvJPEG)
#   vgg19-224-bf16-cl                       VGG19 224, compute only
#   inception_v3-299-bf16-cl                Inception-V3 299, compute only
#   resnet50-224-bf16-cl-compile            ResNet50 224 under torch.compile, last: only if time is left
# OUT_DIR then holds run_gpu.log (everything printed), quick-summary.json (machine, set-up, and per row:
# status ok / failed / timed_out / skipped, exit code, seconds, test counts) rewritten after every
# step, and one bench JSON per bench row: 7 files, within the 8 that the device tool brings back.
# Time: QUICK_BUDGET_S (default 450 s) counts from the start, set-up included; a row starts only if
# the seconds it needs are left and is stopped at its cap or at the end of the budget, whichever
# comes first (needs and caps below, sized for one H100/H200 with 16 cores). QUICK_ROWS="name ..."
# runs only those rows (a second call in the same lease).
# --device cpu hides every GPU (CUDA_VISIBLE_DEVICES=) and --tiny shrinks data, batches, sizes and
# steps, and compiles with the eager backend: `--device cpu --tiny` is the dry run that
# tests/test_run_gpu_quick.py runs on every CI machine, so that this path cannot rot unseen.
set -euo pipefail

usage() { echo "usage: bash benchmarks/run_gpu.sh [--quick [--device cuda|cpu] [--tiny]] [OUT_DIR]" >&2; exit 2; }
quick=0 tiny=0 device=cuda out_dir=
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --tiny) tiny=1 ;;
        --device) [ $# -ge 2 ] || usage; device=$2; shift ;;
        -h|--help) usage ;;
        -*) usage ;;
        *) [ -z "$out_dir" ] || usage; out_dir=$1 ;;
    esac
    shift
done
case $device in cuda|cpu) ;; *) usage ;; esac
if [ $quick = 0 ] && { [ $tiny = 1 ] || [ $device != cuda ]; }; then
    echo "run_gpu.sh: --tiny and --device go with --quick" >&2; exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=${out_dir:-${OUT:-$repo/benchmarks/results}}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
work_dir=${WORK_DIR:-$(mktemp -d)}
mkdir -p "$work_dir"
py=${PYTHON:-python3}
log="$out_dir/run_gpu.log"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ $device = cpu ] && export CUDA_VISIBLE_DEVICES=
exec > >(tee -a "$log") 2>&1

# ---------------------------------------------------------------- wheels the machine lacks
installed_wheels=() install_into=
install_wheelhouse() {
    local house=${WHEELHOUSE:-$repo/.wheelhouse}
    if [ ! -d "$house" ]; then
        echo "no wheelhouse at $house: using the packages already installed"
        return 0
    fi
    # Only the wheels whose distribution is not installed: the machine's own versions stay in use.
    mapfile -t installed_wheels < <("$py" - "$house" <<'EOF'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
    )
    if [ ${#installed_wheels[@]} = 0 ]; then
        echo "every wheel of $house is already installed"
        return 0
    fi
    local pip=("$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check)
    if [ -z "${WHEELHOUSE_TARGET:-}" ] && "$py" -c \
            'import os, sys, sysconfig; sys.exit(not os.access(sysconfig.get_paths()["purelib"], os.W_OK))'; then
        install_into=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "${pip[@]}" "${installed_wheels[@]}" || return 1
    else
        install_into=${WHEELHOUSE_TARGET:-/tmp/site}
        "${pip[@]}" --upgrade --target "$install_into" "${installed_wheels[@]}" || return 1
        export PYTHONPATH="$PYTHONPATH:$install_into"
    fi
    echo "installed into $install_into: ${installed_wheels[*]##*/}"
}

# ---------------------------------------------------------------- the full table
full_run() {
    local per_class=${PER_CLASS:-8000}  # 24,000 frames: one epoch holds all warm-up and timed steps of 256 images
    local workers=${WORKERS:-$(( $(nproc) - 2 ))}  # DataLoader workers: every core but the training process's own
    local steps=${STEPS:-50} warmup=${WARMUP:-15}
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
    install_wheelhouse
    if [ ! -f "$work_dir/shards224/index.json" ]; then
        "$py" -m gastro_dist synth --out "$work_dir/src" --per-class "$per_class" --size-range 1280 1280 --seed 0
        for size in 224 299; do
            "$py" -m gastro_dist pack "$work_dir/src" --out "$work_dir/shards$size" --input-size "$size" \
                --manifest "$work_dir/src/manifest.csv" --val-fraction 0.05 --shard-size 1000
        done
    fi
    train() {  # NAME MODEL BATCH SIZE [extra flags]: compute only and end to end from the shards
        local name=$1 model=$2 batch=$3 size=$4
        shift 4
        "$py" -m gastro_dist bench train --model "$model" --batch-size "$batch" --image-size "$size" \
            --precision bf16 --channels-last --steps "$steps" --warmup "$warmup" --device cuda \
            --shards "$work_dir/shards$size" --workers "$workers" --json "$out_dir/$name.json" "$@" \
            || echo "row $name FAILED (see above); going on with the next"
    }
    train resnet50-224-bf16-cl resnet50 256 224
    train resnet50-224-bf16-cl-compile resnet50 256 224 --compile
    train resnet50-224-bf16-cl-decode-on-device resnet50 256 224 --decode-on device
    train vgg19-224-bf16-cl vgg19 128 224
    train vgg19-224-bf16-cl-compile vgg19 128 224 --compile
    train inception_v3-299-bf16-cl inception_v3 128 299
    train inception_v3-299-bf16-cl-compile inception_v3 128 299 --compile
    for size in 224 299; do
        "$py" -m gastro_dist bench loader --shards "$work_dir/shards$size" --source "$work_dir/src" \
            --workers "$workers" --batches 40 --batch-size 128 --image-size "$size" --json "$out_dir/loader-$size.json"
    done
    "$py" -m gastro_dist bench loader --shards "$work_dir/shards224" --workers "$workers" --batches 40 \
        --batch-size 128 --image-size 224 --decode-on device --json "$out_dir/loader-224-decode-on-device.json"
    echo "results in $out_dir"
}

# ---------------------------------------------------------------- the quick proof
started=$SECONDS
budget_s=${QUICK_BUDGET_S:-450}
summary="$out_dir/quick-summary.json"

note() {  # note set KEY JSON | note row NAME STATUS EXIT_CODE WALL_S LIMIT_S REASON [JUNIT_XML]
    "$py" - "$summary" "$((SECONDS - started))" "$@" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

path, elapsed_s, action, *args = sys.argv[1:]
summary = json.load(open(path)) if os.path.exists(path) else {"rows": []}
if action == "set":
    summary[args[0]] = json.loads(args[1])
else:
    name, status, exit_code, wall_s, limit_s, reason, *junit = args
    row = {"name": name, "status": status, "exit_code": int(exit_code) if exit_code else None,
           "wall_s": int(wall_s), "limit_s": int(limit_s) or None, "reason": reason or None}
    bench_json = os.path.join(os.path.dirname(path), f"{name}.json")
    row["json"] = os.path.basename(bench_json) if os.path.exists(bench_json) else None
    if junit and os.path.exists(junit[0]):
        root = ET.parse(junit[0]).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        row["tests"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        row["not_passed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                             if case.find("failure") is not None or case.find("error") is not None]
    summary["rows"] = [r for r in summary["rows"] if r["name"] != name] + [row]
summary["elapsed_s"] = int(elapsed_s)
summary["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
with open(path + ".tmp", "w") as f:
    f.write(json.dumps(summary, indent=2) + "\n")
os.replace(path + ".tmp", path)
EOF
}

# run_row NAME NEED_S CAP_S [JUNIT_XML] -- COMMAND...: COMMAND runs only if NEED_S seconds of the budget
# are left, for at most CAP_S seconds or the rest of the budget; its outcome is noted whatever it is.
run_row() {
    local name=$1 need_s=$2 cap_s=$3 junit=
    shift 3
    if [ "$1" != -- ]; then junit=$1; shift; fi
    shift
    if [ -n "${QUICK_ROWS:-}" ] && [[ " $QUICK_ROWS " != *" $name "* ]]; then
        return 0
    fi
    local left_s=$(( budget_s - (SECONDS - started) ))
    if [ "$left_s" -lt "$need_s" ]; then
        echo "== $name: skipped: it needs ${need_s} s and ${left_s} s of the ${budget_s} s budget are left"
        note row "$name" skipped "" 0 0 "needs ${need_s} s, ${left_s} s of the budget left"
        return 0
    fi
    local limit_s=$(( cap_s < left_s ? cap_s : left_s )) row_started=$SECONDS exit_code=0 status=ok
    echo "== $name: at $((SECONDS - started)) s, for at most ${limit_s} s: $*"
    timeout --kill-after=10 "$limit_s" "$@" || exit_code=$?
    if [ $exit_code = 124 ] || [ $exit_code = 137 ]; then
        status=timed_out
    elif [ $exit_code != 0 ]; then
        status=failed
    fi
    echo "== $name: $status (exit $exit_code) after $((SECONDS - row_started)) s"
    note row "$name" "$status" "$exit_code" "$((SECONDS - row_started))" "$limit_s" "" $junit
}

quick_run() {
    local machine
    machine=$("$py" - "$device" <<'EOF'
import json, os, platform, sys, torch, torchvision
cuda = torch.cuda.is_available()
if sys.argv[1] == "cuda" and not cuda:
    sys.exit("run_gpu.sh: no CUDA device is visible; for a dry run on the CPU: --quick --device cpu --tiny")
print(json.dumps({"gpu": torch.cuda.get_device_name() if cuda else None, "python": platform.python_version(),
                  "torch": torch.__version__, "torchvision": torchvision.__version__, "cores": os.cpu_count()}))
EOF
    )
    rm -f "$summary"
    note set run "{\"mode\": \"quick\", \"device\": \"$device\", \"tiny\": $([ $tiny = 1 ] && echo true || echo false), \
\"budget_s\": $budget_s, \"finished\": false}"
    note set machine "$machine"
    echo "$machine"
    if [ $device = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
    fi

    # Set-up failures are noted and the rows run all the same: each then fails on its own, and says why.
    local t0=$SECONDS installed=true
    install_wheelhouse || installed=false
    note set wheelhouse "$("$py" -c 'import json, sys; print(json.dumps({"ok": sys.argv[1] == "true",
        "installed": sys.argv[3:], "into": sys.argv[2] or None}))' "$installed" "$install_into" "${installed_wheels[@]##*/}")"
    echo "wheels: $((SECONDS - t0)) s"

    # Sizes. Full: the ResNet50 rows' warm-up and timed steps of 256 images fit in one epoch of the
    # shards, so no worker restart at an epoch boundary is timed. Tiny: a few steps of a few images.
    local size=224 size_inception=299 batch=256 batch_large=128 steps=15 warmup=5
    local workers=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))} backend=${COMPILE_BACKEND:-inductor}
    local frame_width=342  # 5:4 -> 342x273, 4:3 -> 342x256: pack stores them at short side 256, as real frames
    local data_workers=$(nproc)
    if [ $tiny = 1 ]; then
        # Inception-V3 stays at 299: its auxiliary head needs about that much input in training mode.
        size=64 batch=2 batch_large=2 steps=2 warmup=0 workers=1 data_workers=1 frame_width=92
        backend=${COMPILE_BACKEND:-eager}
        # One thread per process: on a small shared CPU, OpenMP threads spinning against each other
        # make each step several times slower.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    fi
    local per_class=$(( (batch * (warmup + steps + 1) * 100 / 95 + 2) / 3 + 1 ))  # 5% of the frames go to val
    per_class=$(( per_class < 8 ? 8 : per_class ))
    local shards="$work_dir/quick-shards$size"
    local made=true
    t0=$SECONDS
    if [ ! -f "$shards/index.json" ]; then
        rm -rf "$work_dir/quick-src"
        "$py" -m gastro_dist synth --out "$work_dir/quick-src" --per-class "$per_class" \
            --size-range "$frame_width" "$frame_width" --seed 0 --workers "$data_workers" &&
        "$py" -m gastro_dist pack "$work_dir/quick-src" --out "$shards" --input-size "$size" \
            --manifest "$work_dir/quick-src/manifest.csv" --val-fraction 0.05 --shard-size 500 \
            --workers "$data_workers" || made=false
    fi
    note set data "{\"ok\": $made, \"shards\": \"$shards\", \"frames\": $(( per_class * 3 )), \
\"image_size\": $size, \"seconds\": $((SECONDS - t0))}"
    echo "data: $((SECONDS - t0)) s"

    local junit="$work_dir/pytest-gpu.xml"
    rm -f "$junit"
    run_row pytest-gpu 120 240 "$junit" -- "$py" -m pytest -o addopts="" -m gpu -q -rA --durations=15 -p no:cacheprovider \
        --continue-on-collection-errors --basetemp "$work_dir/pytest" --junitxml "$junit" tests
    bench() {  # NAME NEED_S CAP_S MODEL BATCH SIZE [flags]
        local name=$1 need_s=$2 cap_s=$3 model=$4 batch=$5 image_size=$6
        shift 6
        run_row "$name" "$need_s" "$cap_s" -- "$py" -m gastro_dist bench train --model "$model" --device "$device" \
            --batch-size "$batch" --image-size "$image_size" --precision bf16 --channels-last --steps "$steps" \
            --warmup "$warmup" --json "$out_dir/$name.json" "$@"
    }
    local from_shards=(--shards "$shards" --workers "$workers")
    bench resnet50-224-bf16-cl 30 120 resnet50 "$batch" "$size" "${from_shards[@]}"
    bench resnet50-224-bf16-cl-decode-on-device 30 120 resnet50 "$batch" "$size" "${from_shards[@]}" --decode-on device
    bench vgg19-224-bf16-cl 20 90 vgg19 "$batch_large" "$size"
    bench inception_v3-299-bf16-cl 20 90 inception_v3 "$batch_large" "$size_inception"
    bench resnet50-224-bf16-cl-compile 150 "$budget_s" resnet50 "$batch" "$size" "${from_shards[@]}" \
        --compile --compile-backend "$backend"
    note set run "{\"mode\": \"quick\", \"device\": \"$device\", \"tiny\": $([ $tiny = 1 ] && echo true || echo false), \
\"budget_s\": $budget_s, \"finished\": true}"
    echo "quick run done in $((SECONDS - started)) s: $summary"
}

if [ $quick = 1 ]; then
    quick_run
else
    full_run
fi
