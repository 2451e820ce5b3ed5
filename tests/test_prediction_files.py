"""Prediction CSVs as untrusted input (`evaluation.prediction_files`): every damaged or edited file handed to
`compare --predictions` stops the command with one line naming the file and the problem, exit status 2,
before anything is written; a good pair is compared; files sharing only some images are compared on those,
with a warning; a huge line is refused after reading a bounded amount."""

from __future__ import annotations

import csv
import io
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gastro_dist import UserError
from gastro_dist.cli import main
from gastro_dist.evaluation.evaluate import _write_predictions_csv
from gastro_dist.evaluation.prediction_files import (MAX_CELL_CHARS, MAX_ROW_BYTES, PROBABILITY_SUM_TOLERANCE,
                                                     read_predictions_csv)

CLASSES = ["gastric_cancer", "gastric_ulcer", "chronic_gastritis"]
NUM_IMAGES = 40


def write_predictions(path: Path, seed: int, classes: list[str] = CLASSES, numbers=range(NUM_IMAGES),
                      prefix: str = "img") -> Path:
    """An `evaluate` predictions.csv of images `prefix`_NUMBER (image k of class k mod C, patient k // 2), written
    by evaluate's own writer."""
    rng = np.random.default_rng(seed)
    numbers = np.array(list(numbers))
    keys = [f"{prefix}_{k:03d}" for k in numbers]
    labels = numbers % len(classes)
    logits = rng.normal(size=(len(keys), len(classes)))
    logits[np.arange(len(keys)), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = np.array([f"patient:p{k // 2}" for k in numbers], dtype=object)
    metas = [{"patient_id": f"p{k // 2}"} for k in numbers]
    _write_predictions_csv(path, keys, metas, groups, labels, probs, logits, classes)
    return path


def edited(path: Path, change) -> Path:
    """`path` rewritten through `change(header, rows)`, which edits the lists of cells in place."""
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    change(header, rows)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    path.write_text(buffer.getvalue())
    return path


def set_cell(row_number: int, column: str, value: str):
    def change(header, rows):
        rows[row_number][header.index(column)] = value
    return change


def compare(tmp_path: Path, first: Path, second: Path, capsys) -> tuple[int, str, str]:
    """`compare --predictions` of two files: exit status, stdout, stderr; asserts nothing was written on failure."""
    out = tmp_path / "cmp"
    capsys.readouterr()
    status = main(["compare", "--predictions", f"a={first}", f"b={second}", "--out", str(out), "--bootstrap", "20"])
    captured = capsys.readouterr()
    if status != 0:
        assert not out.exists(), "a refused comparison wrote something"
        assert len(captured.err.strip().splitlines()) == 1, captured.err
        assert "Traceback" not in captured.err
    return status, captured.out, captured.err


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return write_predictions(tmp_path / "a.csv", 0), write_predictions(tmp_path / "b.csv", 1)


def test_a_good_pair_is_compared(tmp_path, pair, capsys):
    status, out, err = compare(tmp_path, *pair, capsys)
    assert status == 0 and not err and "warning" not in out
    assert "| a − b |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_a_file_rounded_to_six_decimals_is_accepted(tmp_path, pair, capsys):
    """Spreadsheets and other tools write fewer digits: each row then sums to 1 only to about 1e-6."""
    def round_all(header, rows):
        for row in rows:
            for k, name in enumerate(header):
                if name.startswith(("prob_", "logit_")):
                    row[k] = f"{float(row[k]):.6f}"
    edited(pair[1], round_all)
    assert compare(tmp_path, *pair, capsys)[0] == 0


# (what is done to the second file, a phrase the error line must hold)
BAD_CONTENT = {
    "key twice, other probabilities": (
        lambda header, rows: rows.append([*rows[0][:6], rows[0][7], rows[0][6], *rows[0][8:]]),
        "is on line 2 and again on line 42"),
    "inf": (set_cell(3, "prob_gastric_ulcer", "inf"), "line 5: prob_gastric_ulcer is 'inf', not a finite number"),
    "-inf": (set_cell(3, "prob_gastric_ulcer", "-inf"), "not a finite number"),
    "NaN": (set_cell(3, "prob_gastric_cancer", "nan"), "line 5: prob_gastric_cancer is 'nan', not a finite number"),
    "not a number": (set_cell(3, "prob_gastric_cancer", "high"), "'high', not a finite number"),
    "NaN logit": (set_cell(3, "logit_gastric_cancer", "NaN"), "logit_gastric_cancer is 'NaN', not a finite number"),
    "sum 2.7": (lambda header, rows: rows[5].__setitem__(slice(6, 9), ["0.9", "0.9", "0.9"]),
                "line 7: the probabilities sum to 2.7, not 1 (to within 0.001)"),
    "negative": (lambda header, rows: rows[5].__setitem__(slice(6, 9), ["-0.2", "0.2", "1.0"]),
                 "line 7: prob_gastric_cancer is -0.2; probabilities are between 0 and 1"),
    "sum just outside the tolerance": (
        lambda header, rows: rows[2].__setitem__(slice(6, 9), ["0.5", "0.3", str(0.2 + 2 * PROBABILITY_SUM_TOLERANCE)]),
        "the probabilities sum to 1.002"),
    "predicted label edited": (set_cell(0, "predicted_label", "nonsense"), "line 2: predicted_label 'nonsense' is not"),
    "unknown true label": (set_cell(0, "true_label", "polyp"), "true_label 'polyp' is none of the classes"),
    "row cut short": (lambda header, rows: rows[4].__delitem__(slice(8, None)), "line 6 has 8 cells, the header 12"),
    "no key": (set_cell(0, "key", ""), "line 2 has no key"),
    "a column twice": (lambda header, rows: header.__setitem__(1, "key"), "the column(s) key twice"),
    "no probability columns": (lambda header, rows: [header.__setitem__(k, f"p{k}") for k in range(6, 9)],
                               "prob_CLASS columns"),
}


@pytest.mark.parametrize("case", BAD_CONTENT)
def test_a_damaged_or_edited_file_is_one_line_and_nothing_is_written(tmp_path, pair, capsys, case):
    change, phrase = BAD_CONTENT[case]
    edited(pair[1], change)
    status, _, err = compare(tmp_path, *pair, capsys)
    assert status == 2 and f"{pair[1]}: " in err and phrase in err, err


def test_the_first_file_is_checked_as_the_second(tmp_path, pair, capsys):
    edited(pair[0], set_cell(0, "prob_gastric_cancer", "inf"))
    status, _, err = compare(tmp_path, *pair, capsys)
    assert status == 2 and f"{pair[0]}: line 2" in err


@pytest.mark.parametrize("extra_in", ["first", "second"])
def test_other_classes_name_both_lists(tmp_path, capsys, extra_in):
    """A 4-class model's file against a 3-class model's: refused, not compared on the 3 shared columns."""
    four = write_predictions(tmp_path / "four.csv", 0, [*CLASSES, "normal"])
    three = write_predictions(tmp_path / "three.csv", 1)
    files = (four, three) if extra_in == "first" else (three, four)
    status, _, err = compare(tmp_path, *files, capsys)
    assert status == 2 and f"{files[1]}: " in err and f"those of {files[0]} are" in err
    assert "[gastric_cancer, gastric_ulcer, chronic_gastritis, normal] (4)" in err
    assert "[gastric_cancer, gastric_ulcer, chronic_gastritis] (3)" in err


def test_class_columns_in_another_order_are_matched_by_name(tmp_path, capsys):
    first = write_predictions(tmp_path / "a.csv", 0)
    second = tmp_path / "b.csv"
    second.write_bytes(first.read_bytes())

    def reverse_class_columns(header, rows):
        for cells in [header, *rows]:
            cells[6:9], cells[9:12] = cells[6:9][::-1], cells[9:12][::-1]
    edited(second, reverse_class_columns)
    status, _, _ = compare(tmp_path, first, second, capsys)
    assert status == 0
    a, b = (read_predictions_csv(path, CLASSES) for path in (first, second))
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["probs"], b["probs"])


def test_disjoint_keys_are_an_error_with_counts(tmp_path, capsys):
    first = write_predictions(tmp_path / "a.csv", 0)
    second = write_predictions(tmp_path / "b.csv", 1, numbers=range(30), prefix="other")
    status, _, err = compare(tmp_path, first, second, capsys)
    assert status == 2 and "share no image key" in err and f"a: 40 in {first}" in err and f"b: 30 in {second}" in err


def test_partly_shared_keys_are_compared_on_the_shared_ones_with_a_warning(tmp_path, capsys):
    first = write_predictions(tmp_path / "a.csv", 0)
    second = write_predictions(tmp_path / "b.csv", 1, numbers=range(10, 70))
    status, out, _ = compare(tmp_path, first, second, capsys)
    assert status == 0
    assert "warning: 40 images are not in every prediction file (a: 40 in" in out and "uses the 30 images" in out
    assert "(40 scored by only some were left out; images per model: a 40, b 60)" in \
        (tmp_path / "cmp" / "comparison.md").read_text()


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def header_bytes() -> bytes:
    return ("key,source,patient_id,group,true_label,predicted_label,"
            + ",".join(f"prob_{c}" for c in CLASSES) + "\n").encode()


@pytest.mark.parametrize("case,content,phrase", [
    ("empty", b"", "the file is empty"),
    ("header only", header_bytes(), "only a header, no rows"),
    ("latin-1", header_bytes() + "k\u00e9,,,,gastric_cancer,gastric_cancer,1.0,0.0,0.0\n".encode("latin-1"),
     f"not UTF-8 text: byte {len(header_bytes()) + 1} (line 2) is 0xe9"),
    ("a cell above the cell limit", header_bytes() + b"k," + b"x" * (MAX_CELL_CHARS + 1)
     + b",,,gastric_cancer,gastric_cancer,1.0,0.0,0.0\n", f"field larger than field limit ({MAX_CELL_CHARS})"),
    ("a 10 MB cell", header_bytes() + b"k,\"" + b"x" * (10 << 20) + b"\",,,gastric_cancer,gastric_cancer,1,0,0\n",
     f"line 2 makes a row longer than {MAX_ROW_BYTES} bytes"),
])
def test_unreadable_files_are_one_line(tmp_path, pair, capsys, case, content, phrase):
    write_bytes(pair[1], content)
    status, _, err = compare(tmp_path, *pair, capsys)
    assert status == 2 and f"{pair[1]}: " in err and phrase in err, err


def test_a_byte_order_mark_is_accepted(tmp_path, pair, capsys):
    pair[1].write_bytes(b"\xef\xbb\xbf" + pair[1].read_bytes())
    assert compare(tmp_path, *pair, capsys)[0] == 0


def test_missing_files_folders_and_fifos(tmp_path, pair, capsys):
    status, _, err = compare(tmp_path, pair[0], tmp_path / "absent.csv", capsys)
    assert status == 2 and "absent.csv not found" in err
    (tmp_path / "eval").mkdir()  # an evaluate folder without its predictions.csv
    status, _, err = compare(tmp_path, pair[0], tmp_path / "eval", capsys)
    assert status == 2 and f"{tmp_path / 'eval' / 'predictions.csv'} not found" in err
    os.mkfifo(tmp_path / "pipe.csv")  # opened without blocking, and refused
    status, _, err = compare(tmp_path, pair[0], tmp_path / "pipe.csv", capsys)
    assert status == 2 and "not a regular file: FIFO" in err


def test_a_50_mb_line_is_refused_after_reading_a_bounded_amount(tmp_path):
    """Reading stops at MAX_ROW_BYTES: the 50 MB line is never held (a 1 GB one took 6 GB before)."""
    path = tmp_path / "huge.csv"
    with path.open("wb") as handle:
        handle.write(header_bytes() + b"k,")
        for _ in range(50):
            handle.write(b"y" * (1 << 20))
        handle.write(b",,,gastric_cancer,gastric_cancer,1,0,0\n")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(UserError, match="makes a row longer than"):
            read_predictions_csv(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_ROW_BYTES and time.perf_counter() - started < 5
