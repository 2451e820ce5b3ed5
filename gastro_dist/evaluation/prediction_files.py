"""Prediction CSVs read back for statistics: `evaluate`'s predictions.csv, cv's oof_predictions.csv and
test_ensemble_predictions.csv, or any such file handed to `compare --predictions`.

Such a file is input like any other (README, "Robustness"): edited by hand, saved by a spreadsheet,
cut short, or written by another tool. A paired test on a file that holds a key twice, a probability
of 2.7 or a fourth class column would be silently wrong, so a file is checked whole, row by row,
before any number is computed from it, and a bad one stops the command with one line naming the
file, the line and what is wrong (`UserError`, exit 2: the user chose the file).

The csv module parses; what it lacks is written here: reading in bounded memory (a row longer than
`MAX_ROW_BYTES` is refused after reading that much, not held whole as `csv.reader` over a file
would), strict UTF-8 with the byte offset of the first bad byte, and the checks of the content.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gastro_dist import UserError
from gastro_dist.files import csv_text, open_regular_file

# A row is a key, a source path, a patient id, a group, two labels and two numbers per class (at most
# 25 characters each as Python's repr): 1,000 classes take 50 KB, a twentieth of this.
MAX_ROW_BYTES = 1 << 20
# One cell (csv.field_size_limit): keys, paths and patient ids are far shorter (PATH_MAX is 4,096 bytes).
MAX_CELL_CHARS = 1 << 16
# Twice the 10^6 predictions `bench` measures; with MAX_FILE_BYTES it bounds what a file can make us hold.
MAX_ROWS = 2_000_000
MAX_FILE_BYTES = 2 << 30
# |sum of a row's probabilities - 1|. The files gastro-dist writes are exact to float64 (about 1e-16 per
# class); a file rounded to 6 decimals (a spreadsheet, another tool) is off by up to 5e-7 per class, 1.5e-6
# for 3 classes. 1e-3 admits that (up to 2,000 classes, or 4 decimals up to 20), and no row a bug or an
# edit made: those are off by far more (a doubled column, a 0.7 typed for 0.07).
PROBABILITY_SUM_TOLERANCE = 1e-3
PROB, LOGIT = "prob_", "logit_"


def read_predictions_csv(path: str | Path, classes: list[str] | None = None, classes_from: str = "") -> dict:
    """A prediction CSV back as keys, groups (the bootstrap units), patient ids, labels (indices into
    `classes`), probs and logits (None in files without them), the numbers exactly as written, each
    checked (module docstring). Text cells stay as written (`csv_text` form).

    `classes`: the class names the file must have as prob_ columns (any order; the arrays follow
    `classes`); None takes the file's own, in its order. `classes_from` says where `classes` came from,
    for the error when the file has others. Groups: the `group` cell, else (files written before it) the
    patient id, else the key."""
    path = Path(path)
    try:
        handle = open_regular_file(path)
    except FileNotFoundError:
        raise UserError(f"{path} not found: give an `evaluate` --out folder or a predictions CSV") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror or err}") from None
    previous_limit = csv.field_size_limit(MAX_CELL_CHARS)
    try:
        with io.BufferedReader(handle) as buffered:
            return _Reader(path, buffered, classes, classes_from).read()
    finally:
        csv.field_size_limit(previous_limit)


class _Reader:
    """One pass over a prediction CSV: lines checked as they are read (`_lines`), rows as they are parsed."""

    def __init__(self, path: Path, handle: BinaryIO, classes: list[str] | None, classes_from: str):
        self.path, self.handle = path, handle
        self.expected, self.classes_from = classes, classes_from
        self.line = 0  # lines read so far
        self.offset = 0  # bytes read so far
        self.row_bytes = 0  # bytes of the row being parsed; reset after each row

    def fail(self, problem: str) -> UserError:
        return UserError(f"{self.path}: {problem}")

    def _lines(self) -> Iterator[str]:
        """The file's lines as text for csv.reader. A row (its lines, when a quoted cell holds line breaks)
        longer than MAX_ROW_BYTES is refused once that much is read; bytes that are not UTF-8 are refused
        with their offset (a leading byte order mark, as spreadsheets write, is dropped)."""
        while line := self.handle.readline(MAX_ROW_BYTES + 1 - self.row_bytes):
            self.row_bytes += len(line)
            if self.row_bytes > MAX_ROW_BYTES:
                raise self.fail(f"line {self.line + 1} makes a row longer than {MAX_ROW_BYTES} bytes, the limit: "
                                "not a predictions file")
            if self.offset + len(line) > MAX_FILE_BYTES:
                raise self.fail(f"larger than {MAX_FILE_BYTES} bytes, the limit for a predictions file")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise self.fail(f"not UTF-8 text: byte {self.offset + err.start} (line {self.line + 1}) is "
                                f"0x{line[err.start]:02x}; save the file as UTF-8") from None
            self.offset += len(line)
            self.line += 1
            yield text.removeprefix("\ufeff") if self.line == 1 else text

    def read(self) -> dict:
        rows = csv.reader(self._lines())
        try:
            header = next(rows, None)
            if header is None:
                raise self.fail("the file is empty: no header, no rows")
            self.row_bytes = 0
            columns = self._columns(header)
            table = {"keys": [], "groups": [], "patient_ids": [], "labels": [], "probs": [], "logits": []}
            first_line_of = {}
            for cells in rows:
                if cells:  # a blank line, skipped as csv.DictReader does
                    self._add_row(cells, columns, table, first_line_of)
                self.row_bytes = 0
        except csv.Error as err:
            raise self.fail(f"line {self.line}: {err}") from None
        if not table["keys"]:
            raise self.fail("only a header, no rows")
        num_classes = len(columns["classes"])
        return {"path": str(self.path), "classes": columns["classes"], "keys": table["keys"],
                "groups": np.array(table["groups"], dtype=object),
                "patient_ids": table["patient_ids"], "labels": np.array(table["labels"], dtype=np.int64),
                "probs": np.array(table["probs"], dtype=np.float64).reshape(-1, num_classes),
                "logits": (np.array(table["logits"], dtype=np.float64).reshape(-1, num_classes)
                           if columns["logit"] else None)}

    def _columns(self, header: list[str]) -> dict:
        """Where each needed column is, and the classes (those of the prob_ columns)."""
        repeated = sorted(name for name, count in Counter(header).items() if count > 1)
        if repeated:
            raise self.fail(f"the header has the column(s) {', '.join(repeated)} twice")
        missing = [name for name in ("key", "true_label") if name not in header]
        found = [name[len(PROB):] for name in header if name.startswith(PROB)]
        if missing or len(found) < 2:
            raise self.fail(f"no {' and no '.join(missing) or 'prob_CLASS columns for 2 classes or more'} column in "
                            "the header: not a predictions file of gastro-dist")
        classes = found if self.expected is None else list(self.expected)
        if sorted(found) != sorted(classes):
            raise self.fail(f"its probability columns are for [{', '.join(found)}] ({len(found)}) but "
                            f"{self.classes_from or 'the classes expected are'} [{', '.join(classes)}] "
                            f"({len(classes)}); predictions of models with other classes cannot be compared")
        logits = [name[len(LOGIT):] for name in header if name.startswith(LOGIT)]
        if logits and sorted(logits) != sorted(classes):
            raise self.fail(f"its logit columns are for [{', '.join(logits)}], its probability columns for "
                            f"[{', '.join(found)}]")
        position = {name: k for k, name in enumerate(header)}
        groups = [position[name] for name in ("group", "patient_or_key", "patient_id") if name in position]
        return {"width": len(header), "key": position["key"], "true_label": position["true_label"],
                "groups": groups, "patient_id": position.get("patient_id"),
                "predicted_label": position.get("predicted_label"), "classes": classes,
                "prob": [position[PROB + name] for name in classes],
                "logit": [position[LOGIT + name] for name in classes] if logits else None,
                "label_of": {csv_text(name): k for k, name in enumerate(classes)}}

    def _add_row(self, cells: list[str], columns: dict, table: dict, first_line_of: dict) -> None:
        line = self.line
        if len(cells) != columns["width"]:
            raise self.fail(f"line {line} has {len(cells)} cells, the header {columns['width']}")
        if len(table["keys"]) == MAX_ROWS:
            raise self.fail(f"more than {MAX_ROWS} rows, the limit for a predictions file")
        key = cells[columns["key"]]
        if not key:
            raise self.fail(f"line {line} has no key")
        if key in first_line_of:
            raise self.fail(f"the key {key[:80]!r} is on line {first_line_of[key]} and again on line {line}: each "
                            "image must be scored once")
        first_line_of[key] = line
        label = columns["label_of"].get(cells[columns["true_label"]])
        if label is None:
            raise self.fail(f"line {line}: true_label {cells[columns['true_label']][:80]!r} is none of the classes "
                            f"[{', '.join(columns['classes'])}]")
        probs = self._numbers(cells, columns["prob"], PROB, columns["classes"], line)
        if any(not 0.0 <= p <= 1.0 for p in probs):
            name, value = next((c, p) for c, p in zip(columns["classes"], probs) if not 0.0 <= p <= 1.0)
            raise self.fail(f"line {line}: {PROB}{name} is {value!r}; probabilities are between 0 and 1")
        total = math.fsum(probs)
        if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise self.fail(f"line {line}: the probabilities sum to {total:.6g}, not 1 (to within "
                            f"{PROBABILITY_SUM_TOLERANCE:g})")
        if columns["predicted_label"] is not None:
            predicted = columns["label_of"].get(cells[columns["predicted_label"]])
            if predicted is None or probs[predicted] < max(probs):
                raise self.fail(f"line {line}: predicted_label {cells[columns['predicted_label']][:80]!r} is not the "
                                "class of the largest probability: the row was changed after it was written")
        if columns["logit"] is not None:
            table["logits"].append(self._numbers(cells, columns["logit"], LOGIT, columns["classes"], line))
        patient = cells[columns["patient_id"]] if columns["patient_id"] is not None else ""
        table["keys"].append(key)
        table["groups"].append(next((cells[k] for k in columns["groups"] if cells[k]), key))
        table["patient_ids"].append(patient)
        table["labels"].append(label)
        table["probs"].append(probs)

    def _numbers(self, cells: list[str], where: list[int], prefix: str, classes: list[str], line: int) -> list[float]:
        """The cells at `where` as finite floats."""
        numbers = []
        for position, name in zip(where, classes):
            try:
                value = float(cells[position])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise self.fail(f"line {line}: {prefix}{name} is {cells[position][:40]!r}, not a finite number")
            numbers.append(value)
        return numbers
