"""`label-issues`: the frames whose label a reviewer should look at again, from out-of-sample predictions.

Confident learning (cleanlab) compares each frame's given label with the probabilities of a model that
never trained on it: cv's oof_predictions.csv gives that for every train and validation frame. cleanlab
finds the likely label errors (`filter.find_label_issues`), scores every frame
(`rank.get_label_quality_scores`, self-confidence: the probability of the given label) and estimates how
often each given label stands for another true class (`count.estimate_joint`, the calibrated confident
joint). Added here, because no model sees them: frames with the same source bytes (sha256) or nearly the
same picture (64-bit dHash, as pack drops a video's still frames) under different labels.

In-sample predictions are refused: a model is confident on its own training frames, wrong labels
included, so they would hide the errors looked for. Each predicted key is looked up in the shards:
- a key of the `train` split is in-sample (every gastro-dist model of this pack trained on it);
- a key of a fold `fold-N` is out of fold only when the model that predicted it was validated on fold N:
  the file's `fold` column says so (cv's oof_predictions.csv), or, for an `evaluate` predictions.csv,
  the metrics.json beside it names the run, whose summary.json records `fold` N; otherwise it is refused
  (nothing says which model predicted it);
- keys of `val` and `test` were held out from training and are accepted.

Outputs (README, "Label review"): OUT/label_issues.csv, one row per flagged frame, a patient's frames
together, with empty `decision` and `new_label` columns that `pack --relabel` reads once a reviewer has
filled them in, OUT/summary.json (counts, the noise estimate per class pair, settings) and OUT/review.html,
the same frames as an offline page to decide on in the browser (`label_review_page`).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from gastro_dist import RunFailure, UserError
from gastro_dist.config import DataConfig
from gastro_dist.data.frames import difference_hash
from gastro_dist.data.shard_index import ShardIndex, fold_of_split, load_shard_index
from gastro_dist.data.shard_reader import ShardReadError, iter_shard_samples
from gastro_dist.evaluation.label_review_page import (MAX_PATIENT_THUMBNAILS, REVIEW_HTML, ReviewFrame, ReviewUnit,
                                                      cam_overlays, thumbnail_jpeg, write_review_page)
from gastro_dist.evaluation.prediction_files import read_predictions_csv
from gastro_dist.files import (UntrustedDocument, csv_text, excerpt, file_sha256, load_json_untrusted,
                               write_json_atomic, write_text_atomic)
from gastro_dist.run_dir import RunDir, read_json_object

ISSUES_CSV, SUMMARY_JSON = "label_issues.csv", "summary.json"
OOF_PREDICTIONS, CV_JSON = "oof_predictions.csv", "cv.json"  # cv's files (gastro_dist.cv; not imported: torch)
RANKED_BY = "self_confidence"
FILTER_BY = "prune_by_noise_rate"  # cleanlab's default
DEFAULT_NEAR_DUPLICATE_BITS = 3  # as pack's --near-duplicate-bits: hashes 0-2 bits apart are one picture
REASON_CLEANLAB, REASON_EXACT, REASON_NEAR = ("likely mislabelled", "same bytes under another label",
                                              "near-duplicate picture under another label")


def require_cleanlab():
    """cleanlab's modules, or the one line that says how to install the extra."""
    try:
        from cleanlab import count, filter, rank
    except ImportError:
        raise UserError("label-issues needs cleanlab: pip install 'gastro-dist[labels]'") from None
    return count, filter, rank


def cv_inputs(cv_dir: str | Path, shards_dir: str | None) -> tuple[Path, str]:
    """`--cv RUN`: RUN/oof_predictions.csv and the shards cv.json names (unless --shards is given)."""
    cv_dir = Path(cv_dir)
    predictions = cv_dir / OOF_PREDICTIONS
    if not predictions.is_file():
        raise UserError(f"{cv_dir} has no {OOF_PREDICTIONS}: cv writes it once every fold is trained and evaluated "
                        f"(gastro-dist cv ... --out {cv_dir})")
    if shards_dir is None:
        shards_dir = read_json_object(cv_dir / CV_JSON).get("shards")
        if not isinstance(shards_dir, str) or not shards_dir:
            raise UserError(f"{cv_dir / CV_JSON} does not name its shards; pass --shards")
    return predictions, shards_dir


def find_label_issues(predictions_path: str | Path, shards_dir: str | Path, out_dir: str | Path,
                      near_duplicate_bits: int = DEFAULT_NEAR_DUPLICATE_BITS, run: str | Path | None = None) -> dict:
    """Write OUT/label_issues.csv, OUT/summary.json and OUT/review.html (with Grad-CAM overlays of `run`
    for the suggested class, when given); returns summary.json's content."""
    count, cleanlab_filter, rank = require_cleanlab()
    if not 0 <= near_duplicate_bits <= 64:
        raise UserError(f"--near-duplicate-bits must be in 0..64 (0: exact duplicates only), got {near_duplicate_bits}")
    predictions_path, out_dir = Path(predictions_path), Path(out_dir)
    if out_dir.resolve() == predictions_path.parent.resolve():
        raise UserError(f"--out {out_dir} is the predictions' own folder, whose files (a cv or evaluate summary) "
                        f"must stay as they are; pass a folder of its own, e.g. {out_dir / 'label-review'}")
    index = load_shard_index(shards_dir)
    predictions = read_predictions_csv(predictions_path, index.classes, "the shards' classes are")
    keys = predictions["keys"]
    samples = _read_samples(index, set(keys))
    missing = [key for key in keys if key not in samples]
    if missing:
        raise UserError(f"{predictions_path}: {len(missing)} of its {len(keys)} keys ({excerpt(missing[0])} ...) are "
                        f"not in the shards {index.root}: predictions of another pack")
    evidence = out_of_sample_evidence(predictions_path, keys, {key: samples[key]["split"] for key in keys})
    given, probs = predictions["labels"], predictions["probs"]
    classes = index.classes
    absent = [classes[c] for c in range(len(classes)) if not (given == c).any()]
    if absent:
        raise UserError(f"{predictions_path} has no frame labelled {', '.join(absent)}: confident learning needs "
                        "every class among the given labels")

    quality = rank.get_label_quality_scores(given, probs, method=RANKED_BY)
    flagged = cleanlab_filter.find_label_issues(given, probs, filter_by=FILTER_BY, n_jobs=1)
    joint = count.estimate_joint(given, probs)
    reasons: dict[int, list[str]] = defaultdict(list)
    for row in np.flatnonzero(flagged):
        reasons[int(row)].append(REASON_CLEANLAB)
    others: dict[int, set[int]] = defaultdict(set)
    exact = _same_bytes(keys, samples, given)
    near = sorted(set(_near_duplicates(keys, samples, given, near_duplicate_bits)) - set(exact))
    for reason, pairs in ((REASON_EXACT, exact), (REASON_NEAR, near)):
        for a, b in pairs:
            for row, other in ((a, b), (b, a)):
                if reason not in reasons[row]:
                    reasons[row].append(reason)
                others[row].add(other)

    rows = sorted(reasons, key=lambda row: (quality[row], keys[row]))
    rank_of = {row: position + 1 for position, row in enumerate(rows)}
    unit_of = [_review_unit(samples[key], key) for key in keys]
    first_rank_of_unit: dict[str, int] = {}
    for row in rows:
        first_rank_of_unit.setdefault(unit_of[row], rank_of[row])
    frames_of_unit = defaultdict(int)
    for unit in unit_of:
        frames_of_unit[unit] += 1
    flagged_of_unit = defaultdict(int)
    for row in rows:
        flagged_of_unit[unit_of[row]] += 1
    by_patient = sorted(rows, key=lambda row: (first_rank_of_unit[unit_of[row]], unit_of[row], rank_of[row]))

    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_sha256 = file_sha256(predictions_path)
    # review.html first: a --run that does not fit stops before label_issues.csv and summary.json are written.
    _write_review_page(out_dir / REVIEW_HTML, index, keys, samples, unit_of, by_patient, given, probs, rank_of,
                       reasons, f"{predictions_sha256}-{index.index_sha256}", run)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["key", "source", "sha256", "patient", "split", "frame_index", "given_label", "suggested_label",
                     "label_quality", "rank", "reason", "other_label_copies", "patient_frames", "patient_flagged",
                     *[f"prob_{c}" for c in classes], "decision", "new_label"])
    for row in by_patient:
        meta = samples[keys[row]]
        suggested = int(probs[row].argmax())
        frame_index = meta["frame_index"]
        writer.writerow([*map(csv_text, [keys[row], meta["source"], meta["sha256"], meta["patient_id"] or ""]),
                         meta["split"], "" if frame_index is None else frame_index,
                         *map(csv_text, [classes[given[row]], classes[suggested]]), repr(float(quality[row])),
                         rank_of[row], "; ".join(reasons[row]),
                         csv_text(" ".join(sorted(keys[other] for other in others[row]))),
                         frames_of_unit[unit_of[row]], flagged_of_unit[unit_of[row]],
                         *(repr(float(p)) for p in probs[row]), "", ""])
    write_text_atomic(out_dir / ISSUES_CSV, buffer.getvalue())

    summary = {
        "frames": len(keys), "flagged": len(rows),
        "by_reason": {reason: sum(reason in reasons[row] for row in rows)
                      for reason in (REASON_CLEANLAB, REASON_EXACT, REASON_NEAR)},
        "flagged_per_given_label": {c: sum(int(given[row] == k) for row in rows) for k, c in enumerate(classes)},
        "patients_with_flagged_frames": len({unit_of[row] for row in rows}),
        "out_of_sample": evidence,
        "noise": _noise_estimate(joint, classes),
        "settings": {"predictions": str(predictions_path), "predictions_sha256": predictions_sha256,
                     "shards": str(index.root), "shards_index_sha256": index.index_sha256,
                     "cleanlab": {"find_label_issues": {"filter_by": FILTER_BY},
                                  "get_label_quality_scores": {"method": RANKED_BY},
                                  "estimate_joint": "calibrated confident joint"},
                     "near_duplicate_bits": near_duplicate_bits},
    }
    write_json_atomic(out_dir / SUMMARY_JSON, summary)
    print(f"label-issues: {len(rows)} of {len(keys)} frames flagged ({summary['by_reason'][REASON_CLEANLAB]} likely "
          f"mislabelled, {summary['by_reason'][REASON_EXACT]} exact and {summary['by_reason'][REASON_NEAR]} near "
          f"duplicates under another label) in {summary['patients_with_flagged_frames']} patients: "
          f"{out_dir / ISSUES_CSV}; review them in the browser: {out_dir / REVIEW_HTML}")
    return summary


# ---------------------------------------------------------------- review.html
def _write_review_page(path: Path, index: ShardIndex, keys: list[str], samples: dict[str, dict], unit_of: list[str],
                       rows: list[int], given: np.ndarray, probs: np.ndarray, rank_of: dict[int, int],
                       reasons: dict[int, list[str]], page_id: str, run: str | Path | None) -> None:
    """The flagged `rows` (in label_issues.csv's order) and, per patient, up to MAX_PATIENT_THUMBNAILS of its
    frames that are not flagged, read again from the shards (only those keys are kept in memory)."""
    flagged = set(rows)
    units: dict[str, ReviewUnit] = {}
    thumbnail_keys: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        meta = samples[keys[row]]
        units.setdefault(unit_of[row], ReviewUnit(_unit_title(meta, keys[row]))).num_flagged += 1
    for row, unit in enumerate(unit_of):
        if unit in units:
            units[unit].num_frames += 1
            if row not in flagged and len(thumbnail_keys[unit]) < MAX_PATIENT_THUMBNAILS:
                thumbnail_keys[unit].append(keys[row])
    wanted = {keys[row] for row in rows} | {key for group in thumbnail_keys.values() for key in group}
    jpegs = _read_jpegs(index, wanted)
    row_of = {key: row for row, key in enumerate(keys)}
    for unit, unit_keys in thumbnail_keys.items():
        units[unit].thumbnails = [(key, index.classes[given[row_of[key]]], thumbnail_jpeg(jpegs[key]))
                                  for key in unit_keys]
    suggested = [int(probs[row].argmax()) for row in rows]
    if run is None:
        cams = [None] * len(rows)
        cam_note = "Grad-CAM needs a trained run: label-issues ... --run RUN adds its heatmap for the suggested class."
    else:
        cams = cam_overlays(run, index.classes, [jpegs[keys[row]] for row in rows], suggested)
        cam_note = f"Grad-CAM of run {run} for the suggested class, laid over the square the network sees."
    frames = [ReviewFrame(key=keys[row], source=csv_text(samples[keys[row]]["source"]),
                          sha256=samples[keys[row]]["sha256"], frame_index=samples[keys[row]]["frame_index"],
                          unit=unit_of[row], given=int(given[row]),
                          suggested=suggestion, probs=[float(p) for p in probs[row]], rank=rank_of[row],
                          reasons="; ".join(reasons[row]), jpeg=jpegs[keys[row]], cam_jpeg=cam)
              for row, suggestion, cam in zip(rows, suggested, cams)]
    write_review_page(path, frames, units, index.classes, page_id, cam_note)


def _unit_title(meta: dict, key: str) -> str:
    """How review.html names a review unit (`_review_unit`): pseudonyms in a pseudonymised pack."""
    if meta["patient_id"]:
        return f"Patient {meta['patient_id']}"
    return f"Recording {meta['source']}" if meta["source"] else f"Frame {key}"


# ---------------------------------------------------------------- in-sample predictions
def out_of_sample_evidence(path: Path, keys: list[str], split_of: dict[str, str]) -> str:
    """Why every prediction in `path` comes from a model that did not train on the frame (module
    docstring), in words for summary.json; a UserError naming the problem otherwise."""
    in_train = [key for key in keys if split_of[key] == "train"]
    if in_train:
        raise UserError(f"{path} predicts {len(in_train)} frames of the train split ({excerpt(in_train[0])} ...): "
                        "in-sample predictions hide label errors; use cv's out-of-fold predictions "
                        "(gastro-dist cv on a pack made with --folds K, then label-issues --cv RUN)")
    fold_keys = [key for key in keys if fold_of_split(split_of[key]) is not None]
    if not fold_keys:
        return "held-out splits only (" + ", ".join(sorted({split_of[key] for key in keys})) + ")"
    fold_column = _fold_column(path)
    if fold_column is not None:
        wrong = [key for key in fold_keys if fold_column.get(key) != str(fold_of_split(split_of[key]))]
        if wrong:
            raise UserError(f"{path}: the fold column of {excerpt(wrong[0])} ({fold_column.get(wrong[0])!r}) is not "
                            f"the fold it is packed in ({split_of[wrong[0]]}): not out-of-fold predictions")
        return "out of fold: each frame predicted by the model validated on its fold (the file's fold column)"
    details = read_json_object(path.parent / "metrics.json").get("details")
    run = details.get("run") if isinstance(details, dict) else None
    run_fold = RunDir(run).read_summary().get("fold") if isinstance(run, str) else None
    wrong = [key for key in fold_keys if fold_of_split(split_of[key]) != run_fold]
    if run_fold is None or wrong:
        folds = ", ".join(sorted({split_of[key] for key in wrong or fold_keys}))
        raise UserError(f"{path} predicts frames of fold(s) {folds} and nothing shows that the model was validated "
                        "on them (no fold column; no metrics.json beside it naming a run trained with that "
                        "data.fold): in-sample predictions hide label errors; use cv's oof_predictions.csv")
    return f"out of fold: evaluate's predictions of run {run}, validated on fold {run_fold}"


def _fold_column(path: Path) -> dict[str, str] | None:
    """key -> `fold` cell, None when the file has no fold column (it was checked whole already)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "fold" not in (reader.fieldnames or []):
            return None
        return {row["key"]: row["fold"] for row in reader}



# ---------------------------------------------------------------- the shards
def _read_samples(index: ShardIndex, keys: set[str]) -> dict[str, dict]:
    """For each wanted key: its split, its sample json's source, sha256, patient id and frame index, and
    the dHash of its stored picture."""
    max_member_bytes = DataConfig().max_member_mb << 20
    found: dict[str, dict] = {}
    for split in _splits_holding(index, keys):
        for shard in index.shards(split):
            try:
                for sample in iter_shard_samples(shard.path, max_member_bytes, frozenset({"jpg", "json"}),
                                                 shard.num_bytes):
                    if sample.key in keys and not sample.problem and {"jpg", "json"} <= set(sample.members):
                        found[sample.key] = _sample_record(sample.members, split, shard.path)
            except ShardReadError as err:
                raise RunFailure(f"{shard.path}: {err}; check the pack with gastro-dist verify") from None
    return found


def _splits_holding(index: ShardIndex, keys: set[str]) -> list[str]:
    """The splits whose shards hold `keys` (a key starts with its split): only those are read."""
    return [split for split in index.splits if any(key.startswith(f"{split}_") for key in keys)]


def _read_jpegs(index: ShardIndex, keys: set[str]) -> dict[str, bytes]:
    """The stored JPEG of each wanted key (a second pass over its splits' shards: the first keeps no pictures)."""
    max_member_bytes = DataConfig().max_member_mb << 20
    found: dict[str, bytes] = {}
    for split in _splits_holding(index, keys):
        for shard in index.shards(split):
            try:
                for sample in iter_shard_samples(shard.path, max_member_bytes, frozenset({"jpg"}), shard.num_bytes):
                    if sample.key in keys and not sample.problem and "jpg" in sample.members:
                        found[sample.key] = sample.members["jpg"]
            except ShardReadError as err:
                raise RunFailure(f"{shard.path}: {err}; check the pack with gastro-dist verify") from None
    missing = keys - set(found)
    if missing:
        raise RunFailure(f"{index.root}: {len(missing)} frames read a moment ago are gone ({excerpt(min(missing))} "
                         "...); check the pack with gastro-dist verify")
    return found


def _sample_record(members: dict[str, bytes], split: str, shard) -> dict:
    try:
        meta = load_json_untrusted(members["json"], f"a sample json in {shard}")
        with Image.open(io.BytesIO(members["jpg"])) as img:
            picture_hash = difference_hash(img.convert("L"))
    except (UntrustedDocument, OSError, ValueError) as err:
        raise RunFailure(f"{shard}: a sample cannot be read ({str(err)[:80]}); check the pack with "
                         "gastro-dist verify") from None
    if not isinstance(meta, dict):
        raise RunFailure(f"{shard}: a sample json is not an object; check the pack with gastro-dist verify")
    return {"split": split, "source": str(meta.get("source") or ""), "sha256": str(meta.get("sha256") or ""),
            "patient_id": meta.get("patient_id") if isinstance(meta.get("patient_id"), str) else None,
            "frame_index": meta.get("frame_index") if isinstance(meta.get("frame_index"), int) else None,
            "dhash": picture_hash}


def _review_unit(meta: dict, key: str) -> str:
    """What a reviewer looks at together: the patient, else the recording (a video's frames), else the frame."""
    if meta["patient_id"]:
        return f"patient:{meta['patient_id']}"
    return f"source:{meta['source']}" if meta["source"] else f"key:{key}"


# ---------------------------------------------------------------- duplicates under two labels
def _same_bytes(keys: list[str], samples: dict[str, dict], given: np.ndarray) -> list[tuple[int, int]]:
    """Row pairs with the same source bytes and different given labels (pack keeps one copy per label).
    A video's frames share its sha256, so only frames with the same frame index are the same picture."""
    rows_of = defaultdict(list)
    for row, key in enumerate(keys):
        meta = samples[key]
        if meta["sha256"]:
            rows_of[(meta["sha256"], meta["frame_index"])].append(row)
    return sorted((a, b) for rows in rows_of.values() for i, a in enumerate(rows) for b in rows[i + 1:]
                  if given[a] != given[b])


def _near_duplicates(keys: list[str], samples: dict[str, dict], given: np.ndarray,
                     max_bits_exclusive: int) -> list[tuple[int, int]]:
    """Row pairs whose dHashes differ in fewer than `max_bits_exclusive` bits, with different given labels.

    Candidates come from multi-index hashing: two hashes at most d bits apart agree exactly on at least
    one of d + 1 disjoint bit blocks (pigeonhole), so only hashes sharing a block are compared, not all pairs."""
    if max_bits_exclusive == 0:
        return []
    hashes = [samples[key]["dhash"] for key in keys]
    num_blocks = max_bits_exclusive  # d = max_bits_exclusive - 1 bits apart at most
    bounds = [64 * block // num_blocks for block in range(num_blocks + 1)]
    candidates: set[tuple[int, int]] = set()
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = (1 << (end - start)) - 1
        buckets = defaultdict(list)
        for row, value in enumerate(hashes):
            buckets[(value >> start) & mask].append(row)
        for rows in buckets.values():
            candidates.update((a, b) for i, a in enumerate(rows) for b in rows[i + 1:] if given[a] != given[b])
    return sorted((a, b) for a, b in candidates if (hashes[a] ^ hashes[b]).bit_count() < max_bits_exclusive)


def _noise_estimate(joint: np.ndarray, classes: list[str]) -> dict:
    """cleanlab's joint distribution of (given label, true label), as a table and as the class pairs
    where the given label is most often wrong."""
    pairs = [{"given": classes[i], "true": classes[j], "fraction_of_all_frames": float(joint[i, j])}
             for i in range(len(classes)) for j in range(len(classes)) if i != j and joint[i, j] > 0]
    return {"what": "cleanlab count.estimate_joint: P(given label, true label), rows given, columns true",
            "classes": classes, "joint": [[float(value) for value in row] for row in joint],
            "estimated_noise_rate": float(1.0 - np.trace(joint)),
            "pairs": sorted(pairs, key=lambda pair: -pair["fraction_of_all_frames"])}
