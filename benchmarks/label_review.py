"""The label-review measurement of the README ("Label review"): labels flipped on purpose in the demo's synthetic
frames, how many label-issues finds, and what correcting them is worth. Driven by benchmarks/label_review.sh:

  python benchmarks/label_review.py flip IMAGES RATE uniform|pairs OUT   # OUT/manifest.csv and OUT/flips.csv
  python benchmarks/label_review.py score OUT                            # precision/recall of OUT/review's flagged set
  python benchmarks/label_review.py decide IMAGES OUT all|flagged        # OUT/decisions-*.csv for pack --relabel
  python benchmarks/label_review.py accuracy OUT PREDICTIONS.csv         # test accuracy against the true labels

`pairs` flips gastric cancer and gastric ulcer into each other at twice RATE (the demo's classes: a
class-dependent noise); `uniform` flips any frame at RATE to one of the other classes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
import tarfile
from pathlib import Path

PAIRS = {"gastric_cancer": "gastric_ulcer", "gastric_ulcer": "gastric_cancer"}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)


def flip(images: Path, rate: float, mode: str, out: Path) -> None:
    rows = read_csv(images / "manifest.csv")
    classes = sorted({row["label"] for row in rows})
    rng, flips = random.Random(0), []
    for row in rows:
        chance = rate if mode == "uniform" else (2 * rate if row["label"] in PAIRS else 0.0)
        if rng.random() < chance:
            wrong = rng.choice([c for c in classes if c != row["label"]]) if mode == "uniform" else PAIRS[row["label"]]
            flips.append({"path": row["path"], "true": row["label"], "given": wrong})
            row["label"] = wrong
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "manifest.csv", ["path", "label", "patient_id"], rows)
    write_csv(out / "flips.csv", ["path", "true", "given"], flips)
    print(f"{len(flips)} of {len(rows)} labels flipped")


def score(out: Path) -> None:
    """Precision and recall of the flagged set against the flips among the out-of-fold frames."""
    flips = {row["path"] for row in read_csv(out / "flips.csv")}
    source_of = {}
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    source_of[member.name[:-5]] = json.load(tar.extractfile(member))["source"]
    out_of_fold = {source_of[row["key"]] for row in read_csv(out / "cv" / "oof_predictions.csv")}
    true_flips = flips & out_of_fold
    rows = read_csv(out / "review" / "label_issues.csv")
    for name, flagged in (("likely mislabelled", {r["source"] for r in rows if "likely mislabelled" in r["reason"]}),
                          ("any reason", {r["source"] for r in rows})):
        hits = len(flagged & true_flips)
        print(f"{name}: flagged {len(flagged)}, flipped out-of-fold {len(true_flips)}, "
              f"precision {hits / max(1, len(flagged)):.2f}, recall {hits / max(1, len(true_flips)):.2f}")


def decide(images: Path, out: Path, which: str) -> None:
    """`all`: every flipped frame relabelled to its true class (the true corrections); `flagged`: what an
    always-right reviewer decides on label-issues' list (flipped ones relabelled, the others kept)."""
    flips = {row["path"]: row for row in read_csv(out / "flips.csv")}
    if which == "all":
        rows = [{"source": path, "sha256": hashlib.sha256((images / path).read_bytes()).hexdigest(),
                 "decision": "relabel", "new_label": row["true"]} for path, row in flips.items()]
    else:
        rows = [{"source": row["source"], "sha256": row["sha256"],
                 **({"decision": "relabel", "new_label": flips[row["source"]]["true"]} if row["source"] in flips
                    else {"decision": "keep", "new_label": ""})}
                for row in read_csv(out / "review" / "label_issues.csv")]
    write_csv(out / f"decisions-{which}.csv", ["source", "sha256", "decision", "new_label"], rows)
    print(f"{which}: {len(rows)} decisions, {sum(r['decision'] == 'relabel' for r in rows)} relabels")


def accuracy(out: Path, predictions: Path) -> None:
    truth = {row["path"]: row["true"] for row in read_csv(out / "flips.csv")}
    rows = read_csv(predictions)
    correct = sum(truth.get(row["source"], row["true_label"]) == row["predicted_label"] for row in rows)
    print(f"{predictions}: {len(rows)} test frames ({sum(row['source'] in truth for row in rows)} of them flipped), "
          f"accuracy against the true labels {correct / len(rows):.3f}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "flip":
        flip(Path(args[0]), float(args[1]), args[2], Path(args[3]))
    elif command == "score":
        score(Path(args[0]))
    elif command == "decide":
        decide(Path(args[0]), Path(args[1]), args[2])
    elif command == "accuracy":
        accuracy(Path(args[0]), Path(args[1]))
    else:
        sys.exit(__doc__)
