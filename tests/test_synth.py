"""Synthetic data set generator: determinism, manifest, frame geometry, class evidence, argument checks."""

import csv
import errno
import hashlib
import os
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.data import synth
from gastro_dist.data.synth import CLASSES, SynthSummary, generate_dataset

SMALL = dict(size_range=(96, 128), images_per_patient=(2, 3))
PER_CLASS = 4


def _generate(out, **overrides):
    args = dict(per_class=PER_CLASS, seed=0, workers=1, **SMALL)
    args.update(overrides)
    return generate_dataset(out, **args)


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _image_digests(root):
    return {d for name, d in _digests(root).items() if name.endswith(".jpg")}


def _manifest(root):
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, _generate(out)


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path / "again")
    assert _digests(tmp_path / "again") == _digests(out)


def test_worker_count_does_not_change_output(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path / "pool", workers=2)
    assert _digests(tmp_path / "pool") == _digests(out)


def test_different_seed_gives_different_images(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path / "other", seed=1)
    assert _image_digests(out).isdisjoint(_image_digests(tmp_path / "other"))


# ---------------------------------------------------------------- manifest and files
def test_manifest_lists_every_image_once_with_its_folder_label(dataset):
    out, summary = dataset
    rows = _manifest(out)
    assert rows[0] == ["path", "label", "patient_id"]
    body = rows[1:]
    paths = [path for path, _, _ in body]
    assert paths == sorted(paths)
    assert set(paths) == {p.relative_to(out).as_posix() for p in out.rglob("*.jpg")}
    for path, label, _ in body:
        assert path.split("/")[0] == label
        with Image.open(out / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    assert Counter(label for _, label, _ in body) == {c: PER_CLASS for c in CLASSES}
    assert summary == SynthSummary(out, 3 * PER_CLASS, {c: PER_CLASS for c in CLASSES},
                                   len({pid for _, _, pid in body}))


def test_patients_have_one_class_and_several_images(dataset):
    out, summary = dataset
    labels, counts = defaultdict(set), Counter()
    for _, label, patient_id in _manifest(out)[1:]:
        assert re.fullmatch(r"p\d{5}", patient_id)
        labels[patient_id].add(label)
        counts[patient_id] += 1
    assert all(len(classes) == 1 for classes in labels.values())
    assert max(counts.values()) >= 2
    assert all(n <= SMALL["images_per_patient"][1] for n in counts.values())
    assert summary.num_patients == len(counts) < 3 * PER_CLASS


# ---------------------------------------------------------------- frame geometry and styles
def _sizes(root):
    sizes = []
    for path in root.rglob("*.jpg"):
        with Image.open(path) as image:
            sizes.append(image.size)
    return sizes


def test_default_frames_are_within_size_range_with_endoscope_aspects(dataset):
    out, _ = dataset
    for width, height in _sizes(out):
        assert SMALL["size_range"][0] <= width <= SMALL["size_range"][1]
        assert min(abs(height - width / aspect) for aspect in (5 / 4, 4 / 3)) <= 1


def test_alt_style_renders_other_optics(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path / "alt", style="alt")
    sizes = _sizes(tmp_path / "alt")
    assert len(sizes) == 3 * PER_CLASS
    for width, height in sizes:
        assert SMALL["size_range"][0] <= width <= SMALL["size_range"][1]
        assert min(abs(height - width / aspect) for aspect in (16 / 9, 1)) <= 1
    assert _image_digests(tmp_path / "alt").isdisjoint(_image_digests(out))


def test_frames_have_black_surround_and_lit_centre(dataset):
    out, _ = dataset
    for path in out.rglob("*.jpg"):
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        h, w, _ = pixels.shape
        assert pixels[:3, :3].mean() < 12 and pixels[-3:, -3:].mean() < 12
        assert pixels[h // 3:2 * h // 3, w // 3:2 * w // 3].mean() > 40


# ---------------------------------------------------------------- class evidence is not one pixel statistic
def _nearest_mean_accuracy(features, labels):
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    classes = np.unique(labels)
    centres = np.stack([features[labels == k].mean(axis=0) for k in classes])
    predicted = classes[np.argmin(((features[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)]
    return (predicted == labels).mean()


def _mean_colour_accuracies(out, style="default"):
    """Nearest-class-mean accuracy on each frame's mean RGB: over all classes, then per pair of classes."""
    _generate(out, per_class=30, seed=7, images_per_patient=(1, 1), style=style)
    colours, labels = [], []
    for path, label, _ in _manifest(out)[1:]:
        colours.append(np.asarray(Image.open(out / path), dtype=np.float64).mean(axis=(0, 1)))
        labels.append(CLASSES.index(label))
    colours, labels = np.array(colours), np.array(labels)
    pairs = {}
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        pair = (labels == a) | (labels == b)
        pairs[CLASSES[a], CLASSES[b]] = _nearest_mean_accuracy(colours[pair], labels[pair])
    return _nearest_mean_accuracy(colours, labels), pairs


@pytest.mark.parametrize("style", ["default", "alt"])
def test_mean_colour_does_not_separate_classes(tmp_path, style):
    """A nearest-class-mean classifier on each frame's mean RGB stays near chance, over all classes and per pair."""
    overall, pairs = _mean_colour_accuracies(tmp_path, style)
    assert overall < 0.55  # chance: 1/3
    for pair, accuracy in pairs.items():
        assert accuracy < 0.7, pair  # chance: 1/2


def test_mean_colour_check_catches_a_colour_cue(tmp_path, monkeypatch):
    """The check above can fail: frames of one class a fifth redder overall (a cue a CNN would take instead
    of the lesions) are told apart by the same classifier. Smaller shifts hide in the spread of patient palettes."""
    render = synth._render_frame

    def redder_gastritis(rng, label, *args):
        frame = render(rng, label, *args)
        if label != "chronic_gastritis":
            return frame
        r, g, b = frame.split()
        return Image.merge("RGB", (r.point(lambda v: min(255, round(v * 1.2))), g, b))

    monkeypatch.setattr(synth, "_render_frame", redder_gastritis)
    overall, pairs = _mean_colour_accuracies(tmp_path)
    assert overall >= 0.55 or max(pairs.values()) >= 0.7


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("overrides", [
    dict(per_class=0),
    dict(size_range=(200, 100)),
    dict(size_range=(8, 16)),
    dict(size_range=(100,)),
    dict(images_per_patient=(0, 2)),
    dict(style="sepia"),
    dict(workers=0),
    dict(seed=-1),
    dict(classes=("gastric_polyp",)),
])
def test_bad_arguments_raise_user_error(tmp_path, overrides):
    with pytest.raises(UserError):
        _generate(tmp_path / "bad", **overrides)


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "old.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="not an empty folder"):
        _generate(tmp_path)


def test_cli_synth_command(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "cli"), "--per-class", "1", "--size-range", "96", "128",
                 "--workers", "1"]) == 0
    assert len(_manifest(tmp_path / "cli")) == 1 + len(CLASSES)
    assert main(["synth", "--out", str(tmp_path / "bad"), "--per-class", "1", "--style", "sepia"]) == 2
    assert "invalid choice: 'sepia'" in capsys.readouterr().err  # argparse names the choices


def test_cli_synth_write_failures_are_one_line_exit_1(tmp_path, capsys, monkeypatch):
    assert main(["synth", "--out", "/dev/null/x", "--per-class", "1", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Not a directory: /dev/null/x" in err

    def disk_full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", disk_full)  # forked workers inherit the patch
    assert main(["synth", "--out", str(tmp_path / "full"), "--per-class", "1", "--size-range", "96", "128",
                 "--workers", "2"]) == 1  # the error crosses the process pool as the same OSError
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
