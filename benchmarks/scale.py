"""What breaks first at scale: the start of a run on a large pack and the statistics of a large evaluation.

    python benchmarks/scale.py pack PACK_DIR [--out results/scale-pack.json]
        index.json's size and load time; the start-of-run shard check the first time (every shard read)
        and the second (the record of what was verified); epoch planning for 1 to 64 processes.
    python benchmarks/scale.py stats N [--bootstrap 1000] [--out results/scale-stats-N.json]
        evaluate's metrics with intervals and compare's paired tests on N simulated predictions (one
        process per N, so that its peak memory is its own): time and peak resident memory.

Figures in benchmarks/README.md ("Scale"), with the machine they were taken on.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_pack(pack: Path) -> dict:
    from accelerate import Accelerator

    from gastro_dist.data.epoch_plan import train_steps_per_epoch, train_worker_chunks
    from gastro_dist.data.shard_index import load_shard_index
    from gastro_dist.data.verified_shards import RECORD_FILE
    from gastro_dist.training.distributed import checked_shard_index

    (pack / RECORD_FILE).unlink(missing_ok=True)
    started = time.perf_counter()
    index = load_shard_index(pack)
    result = {"samples": sum(index.count(split) for split in index.splits),
              "shards": sum(len(index.shards(split)) for split in index.splits),
              "index_json_bytes": (pack / "index.json").stat().st_size,
              "index_load_s": round(time.perf_counter() - started, 4)}
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory() as run:
        for attempt in ("first", "second"):
            started = time.perf_counter()
            checked_shard_index(accelerator, index, ["train", "val"], 64, run_dir=Path(run))
            result[f"shard_check_{attempt}_s"] = round(time.perf_counter() - started, 3)
    planning = {}
    for world in (1, 8, 64):
        started = time.perf_counter()
        for rank in range(world):
            train_worker_chunks(index.shards("train"), seed=0, epoch=0, rank=rank, world_size=world, batch_size=64,
                                num_workers=4)
        planning[world] = {"steps_per_epoch": train_steps_per_epoch(index.count("train"), world, 64),
                           "plan_all_ranks_s": round(time.perf_counter() - started, 4)}
    result["epoch_planning"] = planning
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def bench_stats(num_predictions: int, num_bootstrap: int) -> dict:
    from gastro_dist.evaluation.metrics import evaluate_predictions
    from gastro_dist.evaluation.paired import compare_models

    rng = np.random.default_rng(0)
    classes = ["chronic_gastritis", "gastric_cancer", "gastric_ulcer"]
    labels = rng.integers(0, 3, num_predictions)
    groups = np.arange(num_predictions) // 10  # 10 frames per patient
    probs = []
    for _ in range(2):
        logits = 1.5 * np.eye(3)[labels] + rng.normal(size=(num_predictions, 3))
        probs.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    result = {"predictions": num_predictions, "patients": int(groups.max() + 1), "bootstrap": num_bootstrap}
    started = time.perf_counter()
    evaluate_predictions(labels, probs[0], classes, groups=groups, num_bootstrap=num_bootstrap,
                         positive_class="gastric_cancer")
    result["evaluate_predictions_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    compare_models(labels, {"a": probs[0], "b": probs[1]}, classes, groups=groups, num_bootstrap=num_bootstrap)
    result["compare_models_s"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack")
    p.add_argument("pack", type=Path)
    p.add_argument("--out", type=Path)
    s = sub.add_parser("stats")
    s.add_argument("n", type=int)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = bench_pack(args.pack) if args.what == "pack" else bench_stats(args.n, args.bootstrap)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
