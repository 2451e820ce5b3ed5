"""label-issues' review.html: self-contained and escaped; in headless Chromium (Playwright driving the system
Chromium) three decisions taken by keyboard are counted, exported as a CSV that `pack --relabel` applies, and
restored from localStorage after a reload; with --run each frame has a Grad-CAM overlay."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
from conftest import write_untrained_run
from imagefactory import noise_image, read_index, read_split, save_image

from gastro_dist.cli import main
from gastro_dist.data.pack import PackSettings, pack_dataset

# Names a page must escape: markup, quotes, a comma and an ampersand (pack refuses slashes in class names).
CLASSES = ['<b>"bold" <script>', "Ulcer, bleeding & more", "élevé 'x'"]
IMAGES_PER_CLASS = 8
# (true class, image number) -> the class it is filed under
FLIPPED = {(0, 1): 2, (0, 6): 1, (1, 2): 0, (1, 5): 2, (2, 3): 1, (2, 4): 0}


@pytest.fixture(scope="module")
def review(tmp_path_factory) -> dict:
    """Grayscale stills of three classes, two per patient, two per class filed under a wrong class, packed in
    2 folds; out-of-fold probabilities of a model that learnt the true classes; label-issues run on them."""
    root = tmp_path_factory.mktemp("review")
    src, rows, true_class = root / "src", [["path", "label", "patient_id"]], {}
    for k in range(len(CLASSES)):
        for i in range(IMAGES_PER_CLASS):
            path = save_image(src / f"c{k}" / f"img{i}.png", img=noise_image((64, 48), 10 * k + i).convert("L"))
            source = path.relative_to(src).as_posix()
            rows.append([source, CLASSES[FLIPPED.get((k, i), k)], f"P{k}-{i // 2}"])
            true_class[source] = k
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    shards = root / "shards"
    pack_dataset(src, shards, PackSettings(input_size=32, resize_short=32, shard_size=64, workers=1, seed=0, folds=2),
                 manifest=manifest)
    rng = np.random.default_rng(0)
    oof = [["key", "fold", "true_label", "predicted_label", *[f"prob_{c}" for c in CLASSES]]]
    for fold in (0, 1):
        for sample in read_split(shards, f"fold-{fold}"):
            probs = rng.dirichlet(np.ones(len(CLASSES))) * 0.2
            probs[true_class[sample["meta"]["source"]]] += 0.8
            oof.append([sample["key"], fold, sample["meta"]["label"], CLASSES[int(probs.argmax())],
                        *map(repr, probs.tolist())])
    predictions = root / "cv" / "oof_predictions.csv"
    predictions.parent.mkdir()
    with predictions.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(oof)
    out = root / "label-review"
    assert main(["label-issues", "--predictions", str(predictions), "--shards", str(shards), "--out", str(out)]) == 0
    with (out / "label_issues.csv").open(newline="", encoding="utf-8") as handle:
        issues = list(csv.DictReader(handle))
    return {"src": src, "manifest": manifest, "shards": shards, "predictions": predictions, "out": out,
            "issues": issues}


def _without_images(page: str) -> str:
    return re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", "", page)


def test_the_page_is_self_contained_and_escapes_class_names(review):
    page = (review["out"] / "review.html").read_text(encoding="utf-8")
    text = _without_images(page)
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert '<b>"bold"' not in text and text.count("<script>") == 1
    assert "&lt;b&gt;&quot;bold&quot; &lt;script&gt;" in text
    assert "Ulcer, bleeding &amp; more" in text and "élevé &#x27;x&#x27;" in text
    assert text.count('<article class="frame"') == len(review["issues"]) >= 3
    assert "Grad-CAM needs a trained run" in text and "Grad-CAM for" not in text
    # each patient's frames that are not flagged, as thumbnails behind a <details>
    assert "<details>" in text and page.count("data:image/jpeg;base64,") > len(review["issues"])


def test_keyboard_decisions_export_a_csv_that_pack_applies_and_survive_a_reload(review, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no chromium binary")
    issues = review["issues"]
    relabel_to = next(k for k in range(len(CLASSES)) if CLASSES[k] != issues[1]["given_label"])
    expected = [[row["source"], row["sha256"], row["frame_index"], "", "", row["key"]] for row in issues]
    expected[0][3] = "keep"
    expected[1][3:5] = ["relabel", CLASSES[relabel_to]]
    expected[2][3] = "exclude"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.route(re.compile(r"^https?://"), lambda route: route.abort())  # nothing may be fetched
            page.goto((review["out"] / "review.html").as_uri())
            counter = page.locator("#counter")
            assert counter.inner_text() == f"0 of {len(issues)} decided"
            for key in ("k", str(relabel_to + 1), "x"):  # each decision moves on to the next frame
                page.keyboard.press(key)
            assert counter.inner_text() == f"3 of {len(issues)} decided"
            with page.expect_download() as download:
                page.click("#export")
            exported = tmp_path / "decisions.csv"
            download.value.save_as(exported)
            page.reload()
            assert counter.inner_text() == f"3 of {len(issues)} decided"
            assert page.locator(".frame .status").all_inner_texts()[:4] == [
                "keep", f"relabel to {CLASSES[relabel_to]}", "exclude", "undecided"]
        finally:
            browser.close()
    with exported.open(newline="", encoding="utf-8-sig") as handle:
        assert list(csv.reader(handle)) == [["source", "sha256", "frame_index", "decision", "new_label", "key"], *expected]

    after = tmp_path / "after"
    assert main(["pack", str(review["src"]), "--manifest", str(review["manifest"]), "--out", str(after), "--folds", "2",
                 "--input-size", "32", "--resize-short", "32", "--workers", "1", "--relabel", str(exported)]) == 0
    assert read_index(after)["relabel"]["applied"] == {"keep": 1, "relabel": 1, "exclude": 1}
    labels = {sample["meta"]["source"]: sample["meta"]["label"]
              for split in ("fold-0", "fold-1") for sample in read_split(after, split)}
    assert labels[issues[0]["source"]] == issues[0]["given_label"]
    assert labels[issues[1]["source"]] == CLASSES[relabel_to]
    assert issues[2]["source"] not in labels
    skipped = [json.loads(line) for line in (after / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(entry["path"], entry["reason"]) for entry in skipped] == [(issues[2]["source"], "excluded on review")]


def test_run_adds_a_grad_cam_overlay_per_frame_and_a_run_of_other_classes_is_refused(review, tmp_path, capsys):
    pytest.importorskip("torch")
    inputs = ["--predictions", str(review["predictions"]), "--shards", str(review["shards"])]
    run = write_untrained_run(tmp_path / "run", CLASSES, image_size=32)
    assert main(["label-issues", *inputs, "--out", str(tmp_path / "with-cam"), "--run", str(run)]) == 0
    page = _without_images((tmp_path / "with-cam" / "review.html").read_text(encoding="utf-8"))
    assert page.count('alt="Grad-CAM"') == len(review["issues"]) and "Grad-CAM needs" not in page

    other = write_untrained_run(tmp_path / "other", ["a", "b", "c"], image_size=32)
    capsys.readouterr()
    assert main(["label-issues", *inputs, "--out", str(tmp_path / "refused"), "--run", str(other)]) == 2
    assert "not the shards'" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "label_issues.csv").exists()
