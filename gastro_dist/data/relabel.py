"""`pack --relabel DECISIONS.csv`: a reviewer's decisions on flagged frames, applied on a re-pack.

A decision names an input by its source (as recorded: relative to SRC, or its pseudonym) and by the sha256
of the bytes the reviewer saw, and says keep, relabel (to `new_label`) or exclude. For a video or multi-frame
DICOM, `frame_index` names the frame decided (label-issues and review.html write it): that frame alone moves
class or is left out; without it the decision is about the whole recording. A decision is applied only when it
still matches what is read now: a file changed since the review, a source that is no longer an input, or a
frame no longer among those packed is listed in relabel_unmatched.jsonl with a warning, never applied
silently. Excluded inputs go to skipped.jsonl ("excluded on review"), excluded frames as parts of their input.
`label-issues` writes label_issues.csv with these columns, so a filled-in copy is a decisions file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from gastro_dist import UserError
from gastro_dist.data.discovery import RELABEL, Input, Inputs, csv_rows, nfc
from gastro_dist.data.pseudonym import Pseudonymiser
from gastro_dist.files import csv_text, file_sha256

DECISIONS = ("keep", "relabel", "exclude")
EXCLUDED_REASON = "excluded on review"
UNMATCHED_FILE = "relabel_unmatched.jsonl"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Decision:
    row: int  # line number in the decisions file
    source: str  # as written, in csv_text form (a spreadsheet-safe cell)
    sha256: str
    decision: str
    new_label: str
    frame_index: int | None = None  # a frame of a video or multi-frame DICOM; None: the whole input

    def entry(self, reason: str) -> dict:
        """A relabel_unmatched.jsonl line."""
        return {"source": self.source, "sha256": self.sha256, "frame_index": self.frame_index,
                "decision": self.decision, "new_label": self.new_label or None, RELABEL.row_field: self.row,
                "reason": reason}


@dataclass
class Decisions:
    """A decisions file read and checked: the decided rows, and how many rows were left undecided."""

    path: Path
    sha256: str
    rows: list[Decision]
    num_undecided: int

    def check_labels(self, classes: set[str]) -> None:
        """Relabelling means to a class the pack has: a typo must not create a class of its own."""
        for decision in self.rows:
            if decision.decision == "relabel" and decision.new_label not in classes:
                raise UserError(f"{RELABEL.option} {self.path} row {decision.row}: new_label "
                                f"{decision.new_label!r} is none of the classes [{', '.join(sorted(classes))}]")


def read_decisions(path: Path) -> Decisions:
    """The rows of a decisions CSV (columns source, sha256, decision[, new_label, frame_index]; others ignored).
    A row without a decision was not reviewed and is counted only; a bad decision, a relabel without new_label,
    a malformed sha256 or frame index, or one source (or frame) decided two ways stops the pack naming the row."""
    if not path.is_file():
        raise UserError(f"{RELABEL.option} {path} not found; pass the CSV a reviewer filled in "
                        "(label-issues writes label_issues.csv with its columns)")
    rows, undecided, first_row_of = [], 0, {}
    for row_number, row in csv_rows(path, RELABEL):
        decision = row["decision"].lower()
        if not decision:
            undecided += 1
            continue
        where = f"{RELABEL.option} {path} row {row_number}"
        if decision not in DECISIONS:
            raise UserError(f"{where}: decision {row['decision']!r} is not one of {', '.join(DECISIONS)}")
        new_label = nfc(row.get("new_label", ""))
        if decision == "relabel" and not new_label:
            raise UserError(f"{where}: relabel needs the class in new_label")
        sha256 = row["sha256"].lower()
        if not _SHA256.fullmatch(sha256):
            raise UserError(f"{where}: sha256 {row['sha256'][:80]!r} is not 64 hex digits")
        frame_text = (row.get("frame_index") or "").strip()
        if frame_text and not (frame_text.isascii() and frame_text.isdigit() and len(frame_text) < 10):
            raise UserError(f"{where}: frame_index {frame_text[:20]!r} is not a frame number (0, 1, 2, ...)")
        current = Decision(row_number, csv_text(row["source"]), sha256, decision,
                           new_label if decision == "relabel" else "", int(frame_text) if frame_text else None)
        earlier = first_row_of.setdefault((current.source, current.frame_index), current)
        if (earlier.sha256, earlier.decision, earlier.new_label) != (sha256, current.decision, current.new_label):
            frame = f" frame {current.frame_index}" if current.frame_index is not None else ""
            raise UserError(f"{where} and row {earlier.row} decide differently about {row['source'][:80]!r}{frame}; "
                            "keep one")
        if earlier is current:
            rows.append(current)
    return Decisions(path, file_sha256(path), rows, undecided)


def apply_decisions(decisions: Decisions, valid: list[Input], inputs: Inputs, pseudonyms: Pseudonymiser,
                    console: Console) -> tuple[list[Input], dict, list[dict]]:
    """The inputs still to pack after the decisions, index.json's `relabel` record, and the decisions not
    applied (relabel_unmatched.jsonl). Relabelled inputs change class in place (a recording's frame through
    `Input.frame_labels`); excluded ones leave `valid` and `inputs.candidates` for `inputs.skipped`, and an
    excluded frame leaves its input's samples."""
    by_source: dict[str, list[Input]] = {}
    for item in valid:
        by_source.setdefault(csv_text(item.source), []).append(item)
    not_packed = {csv_text(entry["path"]): entry["reason"] for entry in inputs.rejected}
    # Identical stills under one label are one picture that pack packs once: a decision about it holds for
    # every copy, or excluding the copy packed would let another copy take its place.
    copies: dict[tuple[str, str], list[Input]] = {}
    for item in valid:
        if not _is_recording(item):
            copies.setdefault((item.sha256, item.label), []).append(item)
    copies_of = {id(item): group for group in copies.values() for item in group}
    decided_by: dict[int, Decision] = {}  # id(input) -> the row applied to it
    applied, unmatched, excluded = Counter(), [], set()

    def exclude(item: Input, decision: Decision) -> None:
        excluded.add(id(item))
        inputs.skipped.append(item.entry(EXCLUDED_REASON, sha256=item.sha256, **{RELABEL.row_field: decision.row}))

    for decision in decisions.rows:
        matches = by_source.get(decision.source, [])
        recording = any(_is_recording(item) for item in matches)
        if not matches:
            reason = (f"input not packed: {not_packed[decision.source]}" if decision.source in not_packed
                      else "no input with this source")
            unmatched.append(decision.entry(reason))
        elif any(item.sha256 != decision.sha256 for item in matches):
            unmatched.append(decision.entry(f"content changed since the review: sha256 is now {matches[0].sha256}"))
        elif decision.frame_index is not None and not recording:
            unmatched.append(decision.entry("a frame_index for a still image, which has no frames"))
        elif decision.frame_index is not None:
            holder = next((item for item in matches for sample in item.samples
                           if sample.frame_index == decision.frame_index), None)
            if holder is None:
                unmatched.append(decision.entry(f"frame {decision.frame_index} is not among the frames packed from "
                                                "this recording (other sampling settings, or a re-encoded file)"))
                continue
            applied[decision.decision] += 1
            if decision.decision == "relabel":
                holder.frame_labels[decision.frame_index] = decision.new_label
            elif decision.decision == "exclude":
                holder.samples = [sample for sample in holder.samples if sample.frame_index != decision.frame_index]
                if holder.samples:
                    inputs.skipped.append({**holder.entry(EXCLUDED_REASON, sha256=holder.sha256,
                                                          **{RELABEL.row_field: decision.row}),
                                           "part": f"frame {decision.frame_index}", "frame_index": decision.frame_index})
                else:  # its last frame: the input leaves the pack
                    exclude(holder, decision)
        elif recording:  # the whole recording (every segment of it)
            applied[decision.decision] += 1
            for item in matches:
                if decision.decision == "relabel":
                    item.label, item.frame_labels = decision.new_label, {}
                elif decision.decision == "exclude":
                    exclude(item, decision)
        elif other := next((decided_by[id(copy)] for item in matches for copy in copies_of[id(item)]
                            if id(copy) in decided_by), None):
            if (other.decision, other.new_label) != (decision.decision, decision.new_label):
                unmatched.append(decision.entry(f"contradicts row {other.row}: an identical copy of the same picture"))
            else:  # the same decision about another copy: applied already
                applied[decision.decision] += 1
        else:
            applied[decision.decision] += 1
            for item in {id(copy): copy for item in matches for copy in copies_of[id(item)]}.values():
                decided_by[id(item)] = decision
                if decision.decision == "relabel":
                    item.label = decision.new_label
                elif decision.decision == "exclude":
                    exclude(item, decision)
    inputs.candidates = [item for item in inputs.candidates if id(item) not in excluded]
    for reason, count in Counter(entry["reason"].split(":")[0] for entry in unmatched).items():
        console.print(f"[yellow]warning:[/] {count} decision(s) in {escape(str(decisions.path))} not applied: "
                      f"{escape(reason)} (see {UNMATCHED_FILE})")
    console.print(f"relabel: {applied['relabel']} relabelled, {applied['exclude']} excluded, {applied['keep']} kept "
                  f"as labelled, {len(unmatched)} not applied, {decisions.num_undecided} undecided rows")
    record = {"file": pseudonyms.path(str(decisions.path.resolve())), "sha256": decisions.sha256,
              "decisions": len(decisions.rows), "applied": {name: applied[name] for name in DECISIONS},
              "not_applied": len(unmatched), "undecided": decisions.num_undecided}
    return [item for item in valid if id(item) not in excluded], record, unmatched


def _is_recording(item: Input) -> bool:
    """A video (or a segment of one) or a multi-frame DICOM: decisions can name one of its frames."""
    return item.frame_counts is not None or item.segment_s is not None
