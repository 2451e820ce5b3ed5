"""Label review: `label-issues` finds labels flipped on purpose in an out-of-fold predictions file built by
hand (no training), frames under two labels, and refuses in-sample predictions; `pack --relabel` applies a
reviewer's decisions and makes a new shard set that an old run folder refuses."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from imagefactory import noise_image, read_index, read_split, save_image

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data.pack import PackSettings, pack_dataset

# Odd names: spaces, accents, a digit first, a dash; four classes.
CLASSES = ["3rd stage", "Ulcer (bleeding)", "gastrite-chronique", "élevé"]
IMAGES_PER_CLASS = 10
FLIPPED = {("3rd stage", 1): "élevé", ("Ulcer (bleeding)", 2): "3rd stage", ("gastrite-chronique", 3): "élevé",
           ("élevé", 4): "Ulcer (bleeding)"}  # (true class, image number) -> the wrong label it is filed under


def _settings(**changes) -> PackSettings:
    return PackSettings(**{"input_size": 32, "resize_short": 32, "shard_size": 64, "workers": 1, "seed": 0,
                           **changes})


def _grey(seed: int):
    return noise_image((64, 48), seed).convert("L")


@pytest.fixture(scope="module")
def flipped_pack(tmp_path_factory) -> dict:
    """Grayscale stills of four classes, two per patient, a few filed under a wrong label, packed in 2 folds;
    plus one picture under two labels as identical bytes and one as the same picture re-encoded."""
    root = tmp_path_factory.mktemp("flipped")
    src, rows, true_class = root / "src", [], {}
    for class_number, cls in enumerate(CLASSES):
        for i in range(IMAGES_PER_CLASS):
            label = FLIPPED.get((cls, i), cls)
            path = save_image(src / f"c{class_number}" / f"img{i}.png", img=_grey(100 * class_number + i))
            source = path.relative_to(src).as_posix()
            rows.append([source, label, f"P{class_number}-{i // 2}"])
            true_class[source] = cls
    twin = src / "twins" / "same.png"
    save_image(twin, img=_grey(999))
    (src / "twins" / "same-copy.png").write_bytes(twin.read_bytes())
    save_image(src / "twins" / "same.jpg", img=_grey(999), quality=95)
    rows += [["twins/same.png", CLASSES[0], "T1"], ["twins/same-copy.png", CLASSES[1], "T1"],
             ["twins/same.jpg", CLASSES[2], "T1"]]
    true_class.update({"twins/same.png": CLASSES[0], "twins/same-copy.png": CLASSES[0], "twins/same.jpg": CLASSES[0]})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "label", "patient_id"], *rows])
    shards = root / "shards"
    pack_dataset(src, shards, _settings(folds=2), manifest=manifest)
    oof = root / "cv" / "oof_predictions.csv"
    _write_oof(shards, oof, true_class)
    return {"root": root, "src": src, "manifest": manifest, "shards": shards, "oof": oof, "true_class": true_class}


def _write_oof(shards: Path, path: Path, true_class: dict[str, str], fold_column: bool = True) -> None:
    """cv's oof_predictions.csv as a model that learnt the true classes would write it."""
    rng = np.random.default_rng(0)
    header = ["key", *(["fold"] if fold_column else []), "patient_id", "group", "true_label", "predicted_label",
              *[f"prob_{c}" for c in CLASSES]]
    rows = []
    for fold in (0, 1):
        for sample in read_split(shards, f"fold-{fold}"):
            meta = sample["meta"]
            probs = rng.dirichlet(np.ones(len(CLASSES))) * 0.2
            probs[CLASSES.index(true_class[meta["source"]])] += 0.8
            rows.append([sample["key"], *([fold] if fold_column else []), meta["patient_id"], meta["patient_id"],
                         meta["label"], CLASSES[int(probs.argmax())], *map(repr, probs.tolist())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])


def _issues(out: Path) -> list[dict]:
    with (out / "label_issues.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_flipped_labels_and_two_label_copies_are_flagged_per_patient(flipped_pack, tmp_path):
    out = tmp_path / "review"
    assert main(["label-issues", "--predictions", str(flipped_pack["oof"]), "--shards", str(flipped_pack["shards"]),
                 "--out", str(out)]) == 0
    rows = _issues(out)
    flipped_sources = {f"c{CLASSES.index(cls)}/img{i}.png" for cls, i in FLIPPED}
    mislabelled = {row["source"] for row in rows if "likely mislabelled" in row["reason"]}
    assert len(flipped_sources & mislabelled) >= 3, rows
    assert len(mislabelled - flipped_sources - {"twins/same-copy.png", "twins/same.jpg"}) <= 2, mislabelled
    for row in rows:
        if row["source"] in flipped_sources:
            assert row["suggested_label"] == flipped_pack["true_class"][row["source"]]
            assert row["given_label"] != row["suggested_label"]
    twins = {row["source"]: row for row in rows if row["source"].startswith("twins/")}
    assert "same bytes under another label" in twins["twins/same.png"]["reason"]
    assert "same bytes under another label" in twins["twins/same-copy.png"]["reason"]
    assert "near-duplicate picture under another label" in twins["twins/same.jpg"]["reason"]
    # one patient's frames are consecutive, patients in the order of their worst frame
    patients = [row["patient"] for row in rows]
    assert all(patients.index(p) + patients.count(p) - 1 == len(patients) - 1 - patients[::-1].index(p)
               for p in patients)
    assert sorted(int(row["rank"]) for row in rows) == list(range(1, len(rows) + 1))
    assert all(row["decision"] == "" and row["new_label"] == "" and len(row["sha256"]) == 64 for row in rows)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["frames"] == len(CLASSES) * IMAGES_PER_CLASS + 3 and summary["flagged"] == len(rows)
    assert summary["out_of_sample"].startswith("out of fold")
    noise = summary["noise"]
    assert noise["classes"] == CLASSES and np.isclose(np.sum(noise["joint"]), 1.0)
    top_pairs = {(pair["given"], pair["true"]) for pair in noise["pairs"][:6]}
    assert ("élevé", "3rd stage") in top_pairs or ("élevé", "gastrite-chronique") in top_pairs, noise["pairs"]
    assert summary["settings"]["cleanlab"]["get_label_quality_scores"] == {"method": "self_confidence"}

    # --cv: the folder's oof_predictions.csv and the shards its cv.json names
    (flipped_pack["oof"].parent / "cv.json").write_text(json.dumps({"shards": str(flipped_pack["shards"])}))
    assert main(["label-issues", "--cv", str(flipped_pack["oof"].parent), "--out", str(tmp_path / "via-cv")]) == 0
    assert _issues(tmp_path / "via-cv") == rows
    cv_dir = str(flipped_pack["oof"].parent)
    assert main(["label-issues", "--cv", cv_dir, "--out", cv_dir]) == 2  # its summary.json would be overwritten


def test_in_sample_predictions_are_refused(flipped_pack, tmp_path, capsys):
    # fold keys with nothing saying which model predicted them
    bare = tmp_path / "eval" / "predictions.csv"
    _write_oof(flipped_pack["shards"], bare, flipped_pack["true_class"], fold_column=False)
    assert main(["label-issues", "--predictions", str(bare), "--shards", str(flipped_pack["shards"]),
                 "--out", str(tmp_path / "a")]) == 2
    assert "in-sample predictions hide label errors" in _one_line(capsys)
    # evaluate's file of a run validated on fold 1 predicting fold 0: that run trained on fold 0
    run = tmp_path / "run-fold1"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"fold": 1}))
    (bare.parent / "metrics.json").write_text(json.dumps({"details": {"run": str(run), "split": "fold-0"}}))
    assert main(["label-issues", "--predictions", str(bare), "--shards", str(flipped_pack["shards"]),
                 "--out", str(tmp_path / "b")]) == 2
    assert "fold-0" in _one_line(capsys)
    # a fold column that disagrees with the fold a frame is packed in
    wrong = tmp_path / "wrong.csv"
    with flipped_pack["oof"].open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    swapped = [lines[0]] + [line.replace(",0,", ",X,").replace(",1,", ",0,").replace(",X,", ",1,")
                            for line in lines[1:]]
    wrong.write_text("\n".join(swapped) + "\n", encoding="utf-8")
    assert main(["label-issues", "--predictions", str(wrong), "--shards", str(flipped_pack["shards"]),
                 "--out", str(tmp_path / "c")]) == 2
    assert "not out-of-fold predictions" in _one_line(capsys)
    # evaluate on the train split of a pack without folds
    plain = tmp_path / "plain"
    pack_dataset(flipped_pack["src"], plain, _settings(val_fraction=0.3), manifest=flipped_pack["manifest"])
    capsys.readouterr()  # pack's own output
    train = read_split(plain, "train")
    in_sample = tmp_path / "train-eval" / "predictions.csv"
    in_sample.parent.mkdir()
    with in_sample.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "source", "patient_id", "group", "true_label", "predicted_label",
                         *[f"prob_{c}" for c in CLASSES]])
        for sample in train:
            probs = [0.1] * len(CLASSES)
            probs[sample["cls"]] = 0.7
            writer.writerow([sample["key"], sample["meta"]["source"], "", "", sample["meta"]["label"],
                             sample["meta"]["label"], *map(repr, probs)])
    assert main(["label-issues", "--predictions", str(in_sample), "--shards", str(plain),
                 "--out", str(tmp_path / "d")]) == 2
    err = _one_line(capsys)
    assert "frames of the train split" in err and "in-sample" in err
    assert not (tmp_path / "d").exists()


def test_missing_cleanlab_is_one_line_naming_the_extra(flipped_pack, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab now raises ImportError
    assert main(["label-issues", "--predictions", str(flipped_pack["oof"]), "--shards", str(flipped_pack["shards"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'gastro-dist[labels]'" in _one_line(capsys)


def test_relabel_round_trip_makes_a_new_shard_set_an_old_run_refuses(flipped_pack, tmp_path, capsys):
    """label_issues.csv filled in: one frame relabelled, one excluded (with the same-label copy pack would
    have dropped as a duplicate), one decision for a file no longer there, one for a file changed since the
    review and one contradicting a decision about a copy of its picture (listed, not applied), the rest
    undecided."""
    import hashlib
    import shutil

    from conftest import REPO
    from gastro_dist.config import load_config
    from gastro_dist.data.shard_index import load_shard_index
    from gastro_dist.run_dir import RunDir
    from gastro_dist.training.trainer import check_run_dir

    review = tmp_path / "review"
    assert main(["label-issues", "--predictions", str(flipped_pack["oof"]), "--shards", str(flipped_pack["shards"]),
                 "--out", str(review)]) == 0
    rows = _issues(review)
    changed = "c2/img5.png"
    src = tmp_path / "src"
    shutil.copytree(flipped_pack["src"], src)
    reviewed_sha256 = hashlib.sha256((src / changed).read_bytes()).hexdigest()
    save_image(src / changed, img=_grey(4242))  # edited after the review
    shutil.copy(src / "c1" / "img2.png", src / "c1" / "img2-copy.png")
    shutil.copy(src / "c3" / "img0.png", src / "c3" / "img0-copy.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(flipped_pack["manifest"].read_text(encoding="utf-8")
                        + "c1/img2-copy.png,3rd stage,P1-9\nc3/img0-copy.png,élevé,P3-9\n", encoding="utf-8")
    by_source = {row["source"]: row for row in rows}
    by_source["c0/img1.png"].update(decision="relabel", new_label="3rd stage")
    by_source["c1/img2.png"].update(decision="exclude")
    rows.append({**rows[0], "source": "gone/img.png", "decision": "keep"})
    rows.append({**rows[0], "source": changed, "sha256": reviewed_sha256, "decision": "exclude"})
    for source, decision in (("c3/img0.png", "keep"), ("c3/img0-copy.png", "exclude")):
        rows.append({**rows[0], "source": source, "decision": decision,
                     "sha256": hashlib.sha256((src / source).read_bytes()).hexdigest()})
    decisions = tmp_path / "decisions.csv"
    with decisions.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    before, after = tmp_path / "before", tmp_path / "after"
    pack = ["pack", str(src), "--manifest", str(manifest), "--folds", "2", "--input-size", "32",
            "--resize-short", "32", "--workers", "1"]
    assert main([*pack, "--out", str(before)]) == 0
    capsys.readouterr()
    assert main([*pack, "--out", str(after), "--relabel", str(decisions)]) == 0
    err = capsys.readouterr().err
    assert "1 decision(s)" in err and "no input with this source" in err and "content changed" in err

    record = read_index(after)["relabel"]
    assert record["sha256"] == hashlib.sha256(decisions.read_bytes()).hexdigest()
    assert record["applied"] == {"keep": 1, "relabel": 1, "exclude": 1}
    assert record["not_applied"] == 3 and record["decisions"] == 6 and record["undecided"] == len(rows) - 6
    unmatched = [json.loads(line) for line in (after / "relabel_unmatched.jsonl").read_text().splitlines()]
    assert {(entry["source"], entry["reason"].split(":")[0]) for entry in unmatched} == {
        ("gone/img.png", "no input with this source"), (changed, "content changed since the review"),
        ("c3/img0-copy.png", f"contradicts row {len(rows)}")}
    skipped = [json.loads(line) for line in (after / "skipped.jsonl").read_text().splitlines()]
    assert sorted((entry["path"], entry["reason"]) for entry in skipped) == [
        ("c1/img2-copy.png", "excluded on review"), ("c1/img2.png", "excluded on review")]
    labels = {sample["meta"]["source"]: sample["meta"]["label"]
              for split in ("fold-0", "fold-1") for sample in read_split(after, split)}
    assert labels["c0/img1.png"] == "3rd stage" and changed in labels
    assert not {"c1/img2.png", "c1/img2-copy.png"} & set(labels)
    assert len({"c3/img0.png", "c3/img0-copy.png"} & set(labels)) == 1  # kept: one copy of the picture
    assert len(labels) == len(flipped_pack["true_class"]) - 1
    assert read_index(before)["relabel"] is None

    # a run trained on the pack before the decisions refuses the new one
    config = load_config(REPO / "configs" / "smoke.yaml", ["data.fold=0"])
    old = load_shard_index(before)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_summary({"shards_index_sha256": old.index_sha256, "shards": str(before), "fold": 0})
    check_run_dir(run, config, old)  # the same shard set continues
    with pytest.raises(UserError, match="index.json differs"):
        check_run_dir(run, config, load_shard_index(after))


def test_bad_decisions_stop_the_pack_naming_the_row(flipped_pack, tmp_path, capsys):
    sha256 = "0" * 64
    for rows, problem in (([["c0/img1.png", sha256, "maybe", ""]], "row 2: decision 'maybe' is not one of"),
                          ([["c0/img1.png", sha256, "relabel", "polyp"]], "new_label 'polyp' is none of the classes"),
                          ([["c0/img1.png", sha256, "keep", ""], ["c0/img1.png", sha256, "exclude", ""]],
                           "row 3 and row 2 decide differently"),
                          ([["v.mp4", sha256, "keep", "", "-1"]], "row 2: frame_index '-1' is not a frame number"),
                          ([["v.mp4", sha256, "keep", "", "7"], ["v.mp4", sha256, "exclude", "", "7"]],
                           "decide differently about 'v.mp4' frame 7")):
        decisions = tmp_path / "decisions.csv"
        with decisions.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["source", "sha256", "decision", "new_label", "frame_index"],
                                          *[row + [""] * (5 - len(row)) for row in rows]])
        out = tmp_path / "out"
        assert main(["pack", str(flipped_pack["src"]), "--manifest", str(flipped_pack["manifest"]), "--out", str(out),
                     "--workers", "1", "--relabel", str(decisions)]) == 2
        err = _one_line(capsys)
        assert problem in err, err
        assert not (out / "index.json").exists()


def test_pseudonymised_pack_round_trip_matches_by_pseudonym(flipped_pack, tmp_path):
    """label_issues.csv and review.html of a pseudonymised pack hold pseudonyms only, and its decisions apply to a re-pack with
    the same key."""
    key = tmp_path / "pseudonym.key"
    key.write_text("k" * 32)
    pack = ["pack", str(flipped_pack["src"]), "--manifest", str(flipped_pack["manifest"]), "--folds", "2",
            "--input-size", "32", "--resize-short", "32", "--workers", "1", "--pseudonymise", str(key)]
    assert main([*pack, "--out", str(tmp_path / "before")]) == 0
    true_class = {}
    for split in ("fold-0", "fold-1"):
        for sample in read_split(tmp_path / "before", split):
            true_class[sample["meta"]["source"]] = sample["meta"]["label"]
    flipped_source = next(source for source, label in true_class.items() if label == CLASSES[0])
    true_class[flipped_source] = CLASSES[1]  # the model is sure this one is another class
    _write_oof(tmp_path / "before", tmp_path / "cv" / "oof_predictions.csv", true_class)
    assert main(["label-issues", "--cv", str(tmp_path / "cv"), "--shards", str(tmp_path / "before"),
                 "--out", str(tmp_path / "review")]) == 0
    rows = _issues(tmp_path / "review")
    assert flipped_source in {row["source"] for row in rows}
    assert not any(name in json.dumps(rows) for name in ("img", "c0/", "P0-"))  # no path or patient id
    page = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", (tmp_path / "review" / "review.html").read_text())
    assert flipped_source in page and not any(name in page for name in ("img0", "c0/", "P0-"))  # nor in review.html
    for row in rows:
        row["decision"] = "exclude" if row["source"] == flipped_source else ""
    decisions = tmp_path / "decisions.csv"
    with decisions.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main([*pack, "--out", str(tmp_path / "after"), "--relabel", str(decisions)]) == 0
    record = read_index(tmp_path / "after")["relabel"]
    assert record["applied"]["exclude"] == 1 and record["not_applied"] == 0
    skipped = [json.loads(line) for line in (tmp_path / "after" / "skipped.jsonl").read_text().splitlines()]
    assert [(entry["path"], entry["reason"]) for entry in skipped] == [(flipped_source, "excluded on review")]


def test_a_videos_mislabelled_frame_is_flagged_with_its_frame_index_and_relabelled_alone(tmp_path):
    """Class folders of stills and videos, no patient ids: out-of-fold predictions say one frame of a video
    shows the other class. label-issues flags that frame with its frame_index, the video's frames are one review
    unit, and the row filled in and passed to `pack --relabel` moves that frame only."""
    pytest.importorskip("av", reason="needs the [video] extra")
    from imagefactory import make_class_tree
    from test_pack_video import scene, write_video

    src, shards = tmp_path / "src", tmp_path / "shards"
    make_class_tree(src, {"normal": 12, "ulcer": 12})
    for number, cls in enumerate(("normal", "ulcer", "normal", "ulcer")):
        write_video(src / cls / f"proc{number}.mp4", [scene(10 * number + second) for second in range(4)])
    settings = _settings(folds=2, near_duplicate_bits=0)
    pack_dataset(src, shards, settings)
    wrong = ("normal/proc0.mp4", 5)  # (video, frame index) that truly shows an ulcer
    samples = {split: read_split(shards, split) for split in ("fold-0", "fold-1")}
    rng = np.random.default_rng(0)
    predictions = tmp_path / "oof_predictions.csv"
    with predictions.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "fold", "true_label", "predicted_label", "prob_normal", "prob_ulcer"])
        for fold, split in enumerate(samples):
            for sample in samples[split]:
                meta = sample["meta"]
                p_ulcer = float(rng.uniform(0.85, 0.95) if meta["label"] == "ulcer" else rng.uniform(0.05, 0.15))
                if (meta["source"], meta["frame_index"]) == wrong:
                    p_ulcer = 0.99
                writer.writerow([sample["key"], fold, meta["label"], "ulcer" if p_ulcer > 0.5 else "normal",
                                 repr(1 - p_ulcer), repr(p_ulcer)])
    review = tmp_path / "review"
    assert main(["label-issues", "--predictions", str(predictions), "--shards", str(shards), "--out", str(review)]) == 0
    rows = _issues(review)
    (flagged,) = [row for row in rows if (row["source"], row["frame_index"]) == (wrong[0], str(wrong[1]))]
    assert flagged["given_label"] == "normal" and flagged["suggested_label"] == "ulcer"
    assert flagged["patient_frames"] == "4"  # its video's 4 sampled frames are reviewed together
    assert 'data-frame-index="5"' in (review / "review.html").read_text(encoding="utf-8")

    flagged.update(decision="relabel", new_label="ulcer")
    decisions = tmp_path / "decisions.csv"
    with decisions.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    after = tmp_path / "after"
    pack_dataset(src, after, settings, relabel=decisions)
    labels = {(sample["meta"]["source"], sample["meta"]["frame_index"]): sample["meta"]["label"]
              for split in ("fold-0", "fold-1") for sample in read_split(after, split)}
    assert labels[wrong] == "ulcer"
    assert [labels[(wrong[0], index)] for index in (0, 10, 15)] == ["normal"] * 3
    assert read_index(after)["relabel"]["applied"]["relabel"] == 1
