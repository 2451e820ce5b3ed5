"""Exact duplicates and patient-grouped splits: which inputs are packed, and into which split.

Inputs that share a patient id, or transitively the same bytes, form one group and always land in one
split; quotas count samples (a video counts with its frames). The same inputs and seed give the same
splits, and the result is checked for leaks rather than trusted from the algorithm.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from gastro_dist import UserError
from gastro_dist.data.discovery import Input
from gastro_dist.data.shard_index import SPLITS, fold_split

_EXACT_TEST_ATTEMPTS = 50  # reshuffles tried before --test-per-class is declared unreachable


@dataclass(frozen=True)
class SplitRules:
    """pack's split options (checked by PackSettings)."""

    seed: int = 0
    val_fraction: float = 0.1
    test_per_class: int | None = None  # exactly this many test samples per class, else test_fraction
    test_fraction: float = 0.0
    folds: int | None = None  # K patient-grouped, stratified folds instead of train and val


def drop_duplicates(items: list[Input], rejected: list[dict]) -> tuple[list[Input], list[Input], list[dict]]:
    """Split into (kept, dropped copies, label conflicts): identical inputs are packed once per label.

    Identical means the same bytes (and, for video segments, the same segment). Copies are taken in sorted
    source order, so the kept copy is the first path alphabetically. Identical stills under different labels
    are all kept (the labels disagree; a human must decide) and reported; the split rules keep them in one split.
    Identical videos under different labels are all kept here, for `keep_frames_once` to keep their frames out.
    """
    copies_by_identity: dict[tuple, list[Input]] = defaultdict(list)
    for item in sorted(items, key=lambda item: item.order):
        copies_by_identity[item.identity].append(item)
    kept, dropped, conflicts = [], [], []
    for (sha256, _), copies in copies_by_identity.items():
        first_by_label: dict[str, Input] = {}
        for item in copies:
            first = first_by_label.setdefault(item.label, item)
            if first is item:
                kept.append(item)
            else:
                dropped.append(item)
                rejected.append(item.entry(f"duplicate of {first.source}", duplicate_of=first.source, sha256=sha256))
        if len(first_by_label) > 1 and copies[0].frame_counts is None:  # frames: `keep_frames_once` decides
            conflicts.append({"sha256": sha256, "copies": [
                {"path": item.source, "label": item.label, "patient_id": item.patient_id} for item in copies]})
    kept.sort(key=lambda item: item.order)
    return kept, dropped, conflicts


def keep_frames_once(kept: list[Input], rejected: list[dict],
                     skipped: list[dict]) -> tuple[list[Input], list[Input], list[dict]]:
    """Split videos and multi-frame DICOMs into (kept, dropped, label conflicts) so that no frame is packed twice.

    Inputs with the same bytes (a copy, a link, segments of one file) are one recording, whatever their
    paths. Where two of them cover the same seconds under one label, the later in sorted order leaves those
    frames out (they are packed once); under different labels both leave them out (a human must decide), the
    conflict is returned for duplicates.jsonl and each side gets a skipped.jsonl line (`part`: the seconds).
    An input left without frames is rejected instead (`duplicate of ...` or `label conflict: ...`).
    """
    by_recording: dict[str, list[Input]] = defaultdict(list)
    for item in kept:
        if item.frame_counts is not None:
            by_recording[item.sha256].append(item)
    overlaps: dict[int, list[tuple[float, float, Input]]] = defaultdict(list)  # id(input) -> (start, end, other)
    conflicts = []
    for sha256, items in by_recording.items():
        for position, item in enumerate(items):  # `kept` is in sorted order: `other` comes first
            for other in items[:position]:
                start_s = max(_seconds(item)[0], _seconds(other)[0])
                end_s = min(_seconds(item)[1], _seconds(other)[1])
                if start_s >= end_s:
                    continue
                overlaps[id(item)].append((start_s, end_s, other))
                if other.label != item.label:
                    overlaps[id(other)].append((start_s, end_s, item))
                    copies = [{"path": copy.source, "label": copy.label, "patient_id": copy.patient_id,
                               "segment_s": list(copy.segment_s) if copy.segment_s else None} for copy in (other, item)]
                    conflicts.append({"sha256": sha256, "seconds": [start_s, end_s if end_s < math.inf else None],
                                      "copies": copies})
    still_kept, dropped = [], []
    for item in kept:
        shared = overlaps.get(id(item), [])
        item.samples = [sample for sample in item.samples
                        if not any(_within(sample.frame_time_s, start_s, end_s) for start_s, end_s, _ in shared)]
        reasons = [(f"{start_s:g}-{end_s:g} s", _shared_reason(item, other)) for start_s, end_s, other in shared]
        if item.samples:
            still_kept.append(item)
            skipped.extend({**item.entry(reason), "part": part} for part, reason in reasons)
            continue
        dropped.append(item)
        first = shared[0][2]
        if all(other.label == item.label for _, _, other in shared):
            rejected.append(item.entry(f"duplicate of {first.source}", duplicate_of=first.source, sha256=item.sha256))
        else:
            rejected.append(item.entry("; ".join(dict.fromkeys(reason for _, reason in reasons))))
    return still_kept, dropped, conflicts


def _seconds(item: Input) -> tuple[float, float]:
    return item.segment_s or (0.0, math.inf)


def _within(time_s: float | None, start_s: float, end_s: float) -> bool:
    """Untimed frames (a DICOM without frame times) are shared whenever their input is (it is never a segment)."""
    return time_s is None or start_s <= time_s < end_s


def _shared_reason(item: Input, other: Input) -> str:
    where = other.source + (f" {other.segment_s[0]:g}-{other.segment_s[1]:g} s" if other.segment_s else "")
    if other.label == item.label:
        return f"duplicate frames: packed from {where} (the same recording, the same label)"
    return f"label conflict: the same frames are labelled {other.label} in {where}; kept out under both labels"


class _Group(NamedTuple):
    """Inputs that must share a split: same patient, or transitively the same bytes (every segment of a video)."""

    items: list[Input]
    class_counts: Counter  # samples per class


def _group_inputs(kept: list[Input], dropped: list[Input]) -> list[_Group]:
    """Union-find over inputs, patient ids and sha256s; groups come out in sorted-source order.

    Dropped duplicate copies still link their patient to the kept copy's group, so a patient whose
    frame was filed twice never straddles splits through the other copy's patient.
    """
    parent: dict[tuple, tuple] = {}

    def find(node: tuple) -> tuple:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a: tuple, b: tuple) -> None:
        parent[find(a)] = find(b)

    for position, item in enumerate(kept):
        union(("input", position), ("sha", item.sha256))
        if item.patient_id is not None:
            union(("input", position), ("patient", item.patient_id))
    for item in dropped:
        if item.patient_id is not None:
            union(("patient", item.patient_id), ("sha", item.sha256))
    members: dict[tuple, list[Input]] = defaultdict(list)
    for position, item in enumerate(kept):
        members[find(("input", position))].append(item)
    return [_Group(items, samples_per_class(items)) for items in members.values()]


def samples_per_class(items: Iterable[Input]) -> Counter:
    counts: Counter = Counter()
    for item in items:
        if item.frame_labels:
            counts.update(item.sample_label(sample) for sample in item.samples)
        else:
            counts[item.label] += len(item.samples)
    return counts


def _fill_quotas(groups: list[_Group], quota: dict[str, int], rng: random.Random,
                 top_up_empty: bool) -> tuple[set[int], Counter]:
    """Pick whole groups (indices) in seeded random order, class by class, without overshooting any quota.

    A group counts toward every class it contains. With `top_up_empty`, a class that got nothing because
    every group overshoots receives its smallest group, provided another group of that class remains.
    """
    chosen: set[int] = set()
    taken: Counter = Counter()
    for cls in sorted(quota):
        order = [index for index, group in enumerate(groups) if cls in group.class_counts]
        rng.shuffle(order)
        for index in order:
            if taken[cls] >= quota[cls]:
                break
            fits = all(taken[k] + n <= quota.get(k, 0) for k, n in groups[index].class_counts.items())
            if fits and index not in chosen:
                chosen.add(index)
                taken.update(groups[index].class_counts)
        remaining = [index for index in order if index not in chosen]
        if top_up_empty and quota[cls] > 0 and taken[cls] == 0 and len(remaining) > 1:
            smallest = min(remaining, key=lambda index: sum(groups[index].class_counts.values()))
            chosen.add(smallest)
            taken.update(groups[smallest].class_counts)
    return chosen, taken


def _fraction_quota(groups: list[_Group], fraction: float) -> dict[str, int]:
    """round(fraction * images) per class, at least 1 and at most all but one when the class has >= 2."""
    class_counts = sum((group.class_counts for group in groups), Counter())
    if fraction <= 0:
        return {cls: 0 for cls in class_counts}
    return {cls: min(max(round(fraction * n), 1), n - 1) for cls, n in class_counts.items()}


def _take_exact_test(groups: list[_Group], classes: list[str], per_class: int, rng: random.Random) -> set[int]:
    class_counts = sum((group.class_counts for group in groups), Counter())
    too_small = [f"{cls} ({class_counts[cls]})" for cls in classes if class_counts[cls] <= per_class]
    if too_small:
        raise UserError(
            f"--test-per-class {per_class} needs more than {per_class} images in every class (some must stay for "
            f"training); too few in: {', '.join(too_small)}. Lower --test-per-class"
        )
    quota = {cls: per_class for cls in classes}
    for _ in range(_EXACT_TEST_ATTEMPTS):
        chosen, taken = _fill_quotas(groups, quota, rng, top_up_empty=False)
        short = [f"{cls} ({taken[cls]})" for cls in classes if taken[cls] != per_class]
        if not short:
            return chosen
    raise UserError(
        f"cannot pick exactly {per_class} test images per class from whole patients (best attempt fell short in: "
        f"{', '.join(short)}); patients with many images make exact counts impossible: try another "
        "--test-per-class or --seed"
    )


def assign_splits(kept: list[Input], dropped: list[Input], classes: list[str],
                   rules: SplitRules) -> dict[str, list[Input]]:
    """Test first (exact per class, or a fraction), then a stratified val fraction of the rest; rest is train.
    With --folds K the rest goes to K folds instead (the test split is the same as without folds).

    Quotas count samples, so a video counts with its frames."""
    groups = _group_inputs(kept, dropped)
    rng = random.Random(f"{rules.seed}:splits")
    if rules.test_per_class:
        test = _take_exact_test(groups, classes, rules.test_per_class, rng)
    else:
        test, _ = _fill_quotas(groups, _fraction_quota(groups, rules.test_fraction), rng, top_up_empty=True)
    remaining = [index for index in range(len(groups)) if index not in test]
    remaining_groups = [groups[index] for index in remaining]
    if rules.folds:
        return _fold_splits(groups, test, remaining_groups, rules)
    val_positions, _ = _fill_quotas(remaining_groups, _fraction_quota(remaining_groups, rules.val_fraction), rng,
                                    top_up_empty=True)
    val = {remaining[position] for position in val_positions}
    splits: dict[str, list[Input]] = {split: [] for split in SPLITS}
    for index, group in enumerate(groups):
        splits["test" if index in test else "val" if index in val else "train"].extend(group.items)
    _check_disjoint(splits)
    return splits


def _fold_splits(groups: list[_Group], test: set[int], remaining_groups: list[_Group],
                 rules: SplitRules) -> dict[str, list[Input]]:
    """fold-0 .. fold-(K-1) from the groups outside the test split, then test."""
    fold_of_group = assign_folds([group.class_counts for group in remaining_groups], rules.folds,
                                 random.Random(f"{rules.seed}:folds"))
    splits: dict[str, list[Input]] = {fold_split(fold): [] for fold in range(rules.folds)}
    for group, fold in zip(remaining_groups, fold_of_group):
        splits[fold_split(fold)].extend(group.items)
    splits["test"] = [item for index in sorted(test) for item in groups[index].items]
    _check_disjoint(splits)
    return splits


def assign_folds(class_counts: list[Counter], num_folds: int, rng: random.Random) -> list[int]:
    """The fold of each group (given as its samples per class), with StratifiedGroupKFold's aim: whole
    groups, and every fold as close as possible to an equal share of every class.

    Greedy, largest group first (equal sizes in seeded random order): each group goes to the fold where
    it adds least to the squared distance from the equal shares, i.e. the smallest sum over its classes
    of (its samples of the class x the fold's samples of the class); ties go to the fold with fewer
    samples, then the lower number. One-image groups thus keep each class's folds within one image of
    each other; a larger group can make a class's folds differ by up to its size.
    """
    if len(class_counts) < num_folds:
        raise UserError(f"--folds {num_folds} needs at least {num_folds} patients (or images without a patient id) "
                        f"outside the test split, and there are {len(class_counts)}; use fewer folds")
    order = list(range(len(class_counts)))
    rng.shuffle(order)
    order.sort(key=lambda index: -sum(class_counts[index].values()))  # stable: shuffled within each size
    in_fold = [Counter() for _ in range(num_folds)]
    size_of_fold = [0] * num_folds
    fold_of = [0] * len(class_counts)
    for index in order:
        counts = class_counts[index]
        fold = min(range(num_folds), key=lambda f: (sum(n * in_fold[f][cls] for cls, n in counts.items()),
                                                    size_of_fold[f], f))
        fold_of[index] = fold
        in_fold[fold].update(counts)
        size_of_fold[fold] += sum(counts.values())
    return fold_of


def _check_disjoint(splits: dict[str, list[Input]]) -> None:
    """The leakage guarantee, checked on the result rather than trusted from the algorithm."""
    for attribute in ("patient_id", "sha256"):
        split_of: dict[str, str] = {}
        for split, items in splits.items():
            for item in items:
                value = getattr(item, attribute)
                if value is not None and split_of.setdefault(value, split) != split:
                    raise RuntimeError(f"internal error: {attribute} {value} is in both {split_of[value]} and {split}")


