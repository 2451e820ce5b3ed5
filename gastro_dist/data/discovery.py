"""Finding pack's inputs: class folders, a manifest or segments CSV, and a class map, each read as the
untrusted input it is, into candidate inputs with labels (and patient ids) plus what was set aside and why.

Paths, labels and patient ids here are as recorded everywhere (relative to SRC with forward slashes, NFC,
pseudonyms with a key). Nothing is opened but folders and CSVs: reading the inputs is pack's work.
"""

from __future__ import annotations

import csv
import math
import os
import posixpath
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from rich.console import Console
from rich.markup import escape

from gastro_dist import UserError
from gastro_dist.data.dicom import DICOM_EXTENSIONS
from gastro_dist.data.frames import FrameCounts
from gastro_dist.data.images import IMAGE_EXTENSIONS
from gastro_dist.data.pseudonym import Pseudonymiser
from gastro_dist.data.video import VIDEO_EXTENSIONS
from gastro_dist.files import UntrustedDocument, file_type, load_json_untrusted, load_yaml_untrusted

_KIND_OF_EXTENSION = {**dict.fromkeys(IMAGE_EXTENSIONS, "image"), **dict.fromkeys(VIDEO_EXTENSIONS, "video"),
                      **dict.fromkeys(DICOM_EXTENSIONS, "dicom")}
# Extensions a pseudonymised path keeps: they say what a file is, not whose it is.
RECORDED_EXTENSIONS = frozenset(_KIND_OF_EXTENSION) | {".csv"}


class SpoolRef(NamedTuple):
    """Where an encoded sample waits in the spool until its split and position are known."""

    file: str
    offset: int
    length: int


class Sample(NamedTuple):
    jpg: SpoolRef
    orig_size: tuple[int, int]
    stored_size: tuple[int, int]
    frame_index: int | None
    frame_time_s: float | None


@dataclass
class Input:
    """One input with its label: a still image, a DICOM, or a video (or one segment of it); reading fills
    sha256, samples and, for a video or multi-frame DICOM, frame_counts."""

    path: Path  # where to read it
    source: str  # path relative to SRC with forward slashes (or its pseudonym), as recorded everywhere
    label: str
    patient_id: str | None  # as recorded (a pseudonym with a key)
    kind: str  # "image", "video" or "dicom"
    segment_s: tuple[float, float] | None = None  # (start, end) of a --segments row
    sha256: str = ""
    samples: list[Sample] = field(default_factory=list)
    frame_counts: FrameCounts | None = None  # None: a still
    frame_labels: dict[int, str] = field(default_factory=dict)  # frame index -> its class, where a review relabelled it

    def sample_label(self, sample: Sample) -> str:
        """A sample's class: the input's, unless a review relabelled that frame of a video."""
        return self.frame_labels.get(sample.frame_index, self.label) if sample.frame_index is not None else self.label

    @property
    def identity(self) -> tuple:
        """Inputs with the same identity give the same samples: the same bytes, and the same segment."""
        return self.sha256, self.segment_s

    @property
    def order(self) -> tuple:
        return self.source, self.label, self.segment_s or (0.0, 0.0)

    def entry(self, reason: str, **extra) -> dict:
        """A rejected.jsonl line for this input."""
        segment = {"segment_s": list(self.segment_s)} if self.segment_s else {}
        return {"path": self.source, "reason": reason, "label": self.label, "patient_id": self.patient_id,
                **segment, **extra}


@dataclass
class Inputs:
    """What discovery found: candidate inputs plus everything already set aside, with reasons."""

    candidates: list[Input] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


class Listing(NamedTuple):
    """A CSV whose rows are the inputs."""

    option: str  # as named in messages
    path_column: str
    required_columns: tuple[str, ...]
    row_field: str  # rejected.jsonl field giving the row of an unusable row
    optional_columns: str = "[,patient_id]"  # as named in messages


MANIFEST = Listing("manifest", "path", ("path", "label"), "manifest_row")
SEGMENTS = Listing("segments file", "video", ("video", "start_s", "end_s", "label"), "segments_row")
# Not inputs but a reviewer's decisions about them (`relabel`), read with the same checks.
RELABEL = Listing("--relabel file", "source", ("source", "sha256", "decision"), "relabel_row",
                  "[,new_label,frame_index]")


def load_class_map(path: Path, console: Console) -> dict[str, str]:
    """Map of folder path (or manifest label) to class name, keys normalised to NFC 'a/b/c', names checked."""
    if not path.is_file():
        raise UserError(f"class map {path} not found; pass a YAML or JSON file mapping folders to classes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"class map {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        load = load_json_untrusted if path.suffix.lower() == ".json" else load_yaml_untrusted
        mapping = load(text, f"class map {path}")
    except UntrustedDocument as err:
        raise UserError(f"{err}; fix it") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"class map {path} must be a non-empty mapping of folder -> class name")
    names_as_written = {}
    for key, value in mapping.items():
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"class map {path}: the class for {key!r} must be a non-empty string")
        names_as_written[_map_key(str(key))] = value.strip()
    class_of = _class_names(set(names_as_written.values()), "class map values", console)
    return {key: class_of[name] for key, name in names_as_written.items()}


def nfc(text: str) -> str:
    """One spelling per name: macOS stores names decomposed (NFD), most other systems composed (NFC)."""
    return unicodedata.normalize("NFC", text)


def _map_key(text: str) -> str:
    """A class-map key, or the folder path or manifest label looked up in the map: NFC, 'a/b/c'."""
    return nfc(text).strip().replace("\\", "/").strip("/")


def unprintable_characters(text: str) -> list[str]:
    """Control, format, surrogate, private-use and unassigned characters (Unicode category C*) in `text`."""
    return sorted({char for char in text if unicodedata.category(char).startswith("C")})


def _class_names(names_as_written: set[str], what: str, console: Console) -> dict[str, str]:
    """Map each class name as written to the name used everywhere (NFC), refusing ambiguous or unsafe names.

    Names that differ only in Unicode normalisation become one class, with a warning. Names that differ
    only in case are refused (a person must say whether they are one class), and so are names holding
    control characters or path separators: class names end up in CSV headers, tracker keys and file names.
    """
    spellings: dict[str, set[str]] = defaultdict(set)
    for name in sorted(names_as_written):
        bad = unprintable_characters(name) + [char for char in "/\\" if char in name]
        if bad:
            raise UserError(f"class name {name!r} contains {', '.join(map(repr, bad))}; rename it, or give it a "
                            "clean name with --class-map (a YAML/JSON file mapping folders or labels to class names)")
        spellings[nfc(name)].add(name)
    for name, forms in sorted(spellings.items()):
        if len(forms) > 1:
            console.print(f"[yellow]warning:[/] {what} {escape(' and '.join(map(ascii, sorted(forms))))} differ only "
                          f"in Unicode normalisation; packed as one class {escape(repr(name))}")
    by_case: dict[str, list[str]] = defaultdict(list)
    for name in sorted(spellings):
        by_case[name.casefold()].append(name)
    for names in by_case.values():
        if len(names) > 1:
            raise UserError(f"class names {' and '.join(map(repr, names))} differ only in case; merge them into one "
                            "class with --class-map (a YAML/JSON file mapping folders or labels to class names), "
                            "or rename them")
    return {name: nfc(name) for name in names_as_written}


def normalise_class_names(inputs: Inputs, what: str, console: Console) -> None:
    """Replace the labels of inputs (candidates and rejected ones) by their checked class names."""
    class_of = _class_names({item.label for item in inputs.candidates} |
                            {entry["label"] for entry in inputs.rejected if entry.get("label")}, what, console)
    for item in inputs.candidates:
        item.label = class_of[item.label]
    for entry in inputs.rejected:
        if entry.get("label"):
            entry["label"] = class_of[entry["label"]]


def _warn_unused_keys(label_for: dict[str, str], used_keys: set[str], what: str, console: Console) -> None:
    for key in sorted(set(label_for) - used_keys):
        console.print(f"[yellow]warning:[/] class map key {key!r} matched no {what}")


def _input_kind(path: str) -> str | None:
    """'image', 'video' or 'dicom' by the extension (any case); None: not an input."""
    return _KIND_OF_EXTENSION.get(Path(path).suffix.lower())


def scan_class_folders(src: Path, out_dir: Path, label_for: dict[str, str] | None, pseudonyms: Pseudonymiser,
                        console: Console) -> Inputs:
    """Class = first-level folder, or with a class map the longest mapped folder prefix of the path."""
    inputs = Inputs()
    files = _walk_tree(src, exclude_dir=out_dir, skipped=inputs.skipped, pseudonyms=pseudonyms)
    used_keys: set[str] = set()
    for source, path in files:
        folders = source.split("/")[:-1]
        kind = _input_kind(source)
        if kind is None:
            inputs.skipped.append({"path": pseudonyms.path(source), "reason": "not an image extension"})
            continue
        if label_for is None:
            label = folders[0] if folders else None
            missing_reason = "not inside a class folder"
        else:
            prefixes = (_map_key("/".join(folders[:depth])) for depth in range(len(folders), 0, -1))
            key = next((prefix for prefix in prefixes if prefix in label_for), None)
            label = label_for[key] if key else None
            used_keys.add(key or "")
            missing_reason = "no class mapping"
        if label is None:
            inputs.skipped.append({"path": pseudonyms.path(source), "reason": missing_reason})
        else:
            inputs.candidates.append(Input(path=path, source=pseudonyms.path(source), label=label, patient_id=None,
                                            kind=kind))
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "folder", console)
    return inputs


def _walk_tree(src: Path, exclude_dir: Path, skipped: list[dict], pseudonyms: Pseudonymiser) -> list[tuple[str, Path]]:
    """All files under src as (relative path, path), in sorted order, following folder symlinks.

    Hidden entries, folders reached twice (symlink loops or two links to one folder) and unreadable
    folders are appended to `skipped`, one entry each (paths as recorded), instead of being entered.
    """
    files: list[tuple[str, Path]] = []
    first_visit: dict[str, str] = {}  # real path of each entered folder -> relative path it was entered as

    def skip(rel_path: str, reason: str) -> None:
        skipped.append({"path": pseudonyms.path(rel_path), "reason": reason})

    def visit(folder: Path, rel_folder: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(folder)
        if real in first_visit:
            first = first_visit[real]
            is_loop = real in ancestors
            skip(rel_folder + "/", "symlink loop" if is_loop else
                 f"already scanned: same folder as {pseudonyms.path(first) if first else '.'}")
            return
        first_visit[real] = rel_folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            skip(rel_folder + "/", f"unreadable folder: {err.strerror or err}")
            return
        for entry in entries:
            rel_path = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
            is_dir = entry.is_dir()  # follows symlinks
            if entry.name.startswith("."):
                kind = "folder" if is_dir else "file"
                skip(rel_path + ("/" if is_dir else ""), f"hidden {kind}")
            elif is_dir:
                if os.path.realpath(entry.path) != str(exclude_dir):
                    visit(Path(entry.path), rel_path, ancestors | {real})
            elif entry.is_file():  # links followed
                files.append((rel_path, Path(entry.path)))
            else:
                try:
                    kind = file_type(entry.stat().st_mode)  # never opened: a FIFO blocks, a device never ends
                except OSError:  # a broken link: rejected as unreadable later, with its label
                    files.append((rel_path, Path(entry.path)))
                else:
                    skip(rel_path, f"not a regular file: {kind}")

    visit(src, "", frozenset())
    return files


def read_listings(listings: list[tuple[Listing, Path]], src: Path, label_for: dict[str, str] | None,
                   pseudonyms: Pseudonymiser, console: Console) -> Inputs:
    """The rows of --manifest and --segments are the only inputs; with a class map, labels are renamed and
    unmapped ones skipped. Overlapping segments are settled once the videos are read, by their bytes (a copy or
    a link of a video is the same video): `splitting.keep_frames_once`."""
    inputs = Inputs()
    used_keys: set[str] = set()
    for listing, path in listings:
        _read_listing(listing, path, src, label_for, pseudonyms, inputs, used_keys)
    if label_for is not None:
        _warn_unused_keys(label_for, used_keys, "manifest label", console)
    return inputs


def _read_listing(listing: Listing, csv_path: Path, src: Path, label_for: dict[str, str] | None,
                  pseudonyms: Pseudonymiser, inputs: Inputs, used_keys: set[str]) -> None:
    """Rows are untrusted: a path leading outside SRC is skipped and never read, and so is anything but a
    regular file."""
    if not csv_path.is_file():
        raise UserError(f"{listing.option} {csv_path} not found; pass a CSV with columns "
                        f"{','.join(listing.required_columns)}[,patient_id]")
    for row_number, row in csv_rows(csv_path, listing):
        cell = row[listing.path_column]
        relative = _manifest_source(cell, src) if cell else f"<{listing.option} row {row_number}>"
        source = pseudonyms.path(relative or cell)
        label, patient_id = row["label"], pseudonyms.patient_id(nfc(row.get("patient_id", "")) or None)
        if label_for is not None and label:
            used_keys.add(_map_key(label))
            label = label_for.get(_map_key(label), "")
            if not label:
                inputs.skipped.append({"path": source, "reason": "no class mapping", "label": row["label"]})
                continue
        if relative is None:
            inputs.skipped.append({"path": source, "reason": "outside the source folder", "label": label})
            continue
        kind = _input_kind(relative)
        item = Input(path=src / relative, source=source, label=label, patient_id=patient_id, kind=kind or "")
        if not cell:
            inputs.rejected.append(item.entry(f"empty path in {listing.option}", **{listing.row_field: row_number}))
        elif not label:
            inputs.rejected.append(item.entry(f"empty label in {listing.option}", **{listing.row_field: row_number}))
        elif kind is None or (listing is SEGMENTS and kind != "video"):
            extension = "a video" if listing is SEGMENTS else "an image"
            inputs.skipped.append({"path": source, "reason": f"not {extension} extension", "label": label})
        else:
            if listing is SEGMENTS:
                try:
                    item.segment_s = _segment_times(row)
                except ValueError as err:
                    inputs.rejected.append(item.entry(f"bad segment: {err}", **{listing.row_field: row_number}))
                    continue
            try:
                kind_on_disk = file_type(os.stat(item.path).st_mode)  # links followed, nothing opened
            except OSError as err:
                missing = isinstance(err, (FileNotFoundError, NotADirectoryError))
                inputs.rejected.append(item.entry("missing file" if missing else
                                                  f"unreadable file: {err.strerror or err}"))
                continue
            if kind_on_disk == "file":
                inputs.candidates.append(item)
            else:
                inputs.skipped.append({"path": source, "reason": f"not a regular file: {kind_on_disk}", "label": label})


def _segment_times(row: dict[str, str]) -> tuple[float, float]:
    try:
        start_s, end_s = float(row["start_s"]), float(row["end_s"])
    except ValueError:
        raise ValueError(f"start_s {row['start_s']!r} and end_s {row['end_s']!r} must be numbers of seconds") from None
    if not (math.isfinite(end_s) and 0 <= start_s < end_s):
        raise ValueError(f"start_s {start_s:g} and end_s {end_s:g} must satisfy 0 <= start_s < end_s")
    return start_s, end_s


def csv_rows(path: Path, listing: Listing) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped cells by lower-case column name) of each data row of a UTF-8 CSV."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet exports add a BOM
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]  # "Path, Label" works too
            missing_columns = [name for name in listing.required_columns if name not in reader.fieldnames]
            if missing_columns:
                raise UserError(
                    f"{listing.option} {path} lacks column(s) {', '.join(missing_columns)}; "
                    f"its first row must be a header with {','.join(listing.required_columns)}"
                    f"{listing.optional_columns}"
                )
            for row_number, raw_row in enumerate(reader, start=2):
                row = {key: (value or "").strip() for key, value in raw_row.items() if key}
                _refuse_damaged_row(path, listing, row_number, row)
                yield row_number, row
    except UnicodeDecodeError:
        raise UserError(f"{listing.option} {path} is not UTF-8 text; save it as UTF-8 ('CSV UTF-8')") from None
    except csv.Error as err:
        raise UserError(f"{listing.option} {path} is not a readable CSV ({err}); save it again as CSV") from None


def _refuse_damaged_row(path: Path, listing: Listing, row_number: int, row: dict[str, str]) -> None:
    """A NUL in a path or an unprintable character in a patient id means a damaged (or hostile) file: stop.

    (A patient id is the unit the splits keep apart, so a garbled one must not silently become a new patient.)
    """
    cell = row[listing.path_column]
    if "\0" in cell:
        raise UserError(f"{listing.option} {path} row {row_number}: the path {cell!r} contains a NUL character; "
                        "fix that row")
    bad = unprintable_characters(row.get("patient_id", ""))
    if bad:
        raise UserError(f"{listing.option} {path} row {row_number}: patient_id {row['patient_id']!r} contains "
                        f"{', '.join(map(repr, bad))}; fix that row")


def _manifest_source(cell: str, src: Path) -> str | None:
    """The row's path relative to SRC with forward slashes, or None when it leads outside SRC.

    '..' is resolved on the text ('a/../b.jpg' is 'b.jpg'), so it can never climb out of SRC through a folder
    link. An absolute path counts when it lies under SRC as written or once its folder links are resolved.
    """
    path = posixpath.normpath(cell.replace("\\", "/"))
    if not posixpath.isabs(path):
        return None if path == ".." or path.startswith("../") else path
    folder, name = posixpath.split(path)
    for candidate in (Path(folder), Path(os.path.realpath(folder))):
        if candidate.is_relative_to(src):
            return (candidate.relative_to(src) / name).as_posix()
    return None


