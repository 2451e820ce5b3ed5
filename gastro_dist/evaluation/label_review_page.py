"""`label-issues`' review.html: the flagged frames as a page a clinician reviews in the browser, offline.

One self-contained file (no server, no network, no external script or font): pictures are base64 data
URIs, every text from the data (keys, sources or their pseudonyms, patients, class names) goes through
html.escape, and the small script reads what it needs from escaped data attributes. The reviewer decides
keep / relabel / exclude per frame with the keyboard or buttons; decisions are kept in the browser's
localStorage under the page's id (the predictions' and shards' hashes, so two reviews never mix) and
exported client-side as a CSV with the columns `pack --relabel` reads.

Size stays bounded: flagged frames at their stored resolution, and per patient at most
`MAX_PATIENT_THUMBNAILS` of its other predicted frames as small thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from gastro_dist import UserError
from gastro_dist.files import write_text_atomic

REVIEW_HTML = "review.html"
MAX_PATIENT_THUMBNAILS = 24
THUMBNAIL_PX = 96  # the thumbnails' longer side
SHORTCUT_CLASSES = 9  # keys 1..9 relabel to the first nine classes; buttons cover any number


@dataclass
class ReviewFrame:
    """A flagged frame as label_issues.csv describes it, with its stored JPEG (and Grad-CAM overlay)."""
    key: str
    source: str  # as in label_issues.csv (a pseudonym in a pseudonymised pack; csv_text form)
    sha256: str
    frame_index: int | None  # a video's or multi-frame DICOM's frame; None for a still
    unit: str  # the patient, recording or frame it is reviewed with (`label_issues._review_unit`)
    given: int
    suggested: int
    probs: list[float]
    rank: int
    reasons: str
    jpeg: bytes
    cam_jpeg: bytes | None = None


@dataclass
class ReviewUnit:
    """A patient (or recording) with flagged frames: its name and its other predicted frames' thumbnails."""
    title: str
    num_frames: int = 0  # in the predictions
    num_flagged: int = 0
    thumbnails: list[tuple[str, str, bytes]] = field(default_factory=list)  # (key, given label, JPEG)


def thumbnail_jpeg(jpeg: bytes) -> bytes:
    """A small JPEG of a stored frame, for a patient's other frames."""
    with Image.open(io.BytesIO(jpeg)) as img:
        img = img.convert("L" if img.mode == "L" else "RGB")
        img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def cam_overlays(run: str | Path, classes: list[str], jpegs: list[bytes], class_indices: list[int],
                 batch_size: int = 16) -> list[bytes]:
    """Each frame at its stored size with the run's Grad-CAM for the given class laid over the square the
    network sees (`cam.eval_crop_box`), as JPEG: how `predict-video` annotates its frames."""
    import torch

    from gastro_dist.data.augmentation import eval_transform
    from gastro_dist.data.images import load_rgb
    from gastro_dist.evaluation.cam import eval_crop_box, grad_cam, overlay_heatmap
    from gastro_dist.evaluation.inference import load_trained_model

    trained = load_trained_model(run)
    if trained.classes != classes:
        raise UserError(f"--run {run} was trained on the classes {trained.classes}, not the shards' {classes}")
    data_cfg = trained.data_config()
    transform = eval_transform(data_cfg)
    overlays = []
    for start in range(0, len(jpegs), batch_size):
        images = [load_rgb(jpeg) for jpeg in jpegs[start:start + batch_size]]
        cams, _ = grad_cam(trained.model, torch.stack([transform(image) for image in images]),
                           class_index=class_indices[start:start + batch_size])
        for image, cam in zip(images, cams):
            box = tuple(round(v) for v in eval_crop_box(*image.size, trained.image_size, data_cfg.eval_crop_ratio))
            image.paste(overlay_heatmap(image.crop(box), cam.numpy()), box[:2])
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            overlays.append(buffer.getvalue())
    return overlays


def write_review_page(path: Path, frames: list[ReviewFrame], units: dict[str, ReviewUnit], classes: list[str],
                      page_id: str, cam_note: str) -> None:
    """review.html: `frames` in label_issues.csv's order (a patient's together), each patient's section
    opening with its other frames on demand."""
    legend = "".join(
        f'<li data-class="{html.escape(name)}"><kbd>{k + 1}</kbd> {html.escape(name)}</li>' if k < SHORTCUT_CLASSES
        else f'<li data-class="{html.escape(name)}">{html.escape(name)} (button only)</li>'
        for k, name in enumerate(classes))
    sections, current_unit = [], None
    for frame in frames:
        if frame.unit != current_unit:
            if current_unit is not None:
                sections.append("</section>")
            current_unit = frame.unit
            sections.append(f'<section class="unit">{_unit_header(units[frame.unit])}')
        sections.append(_frame_card(frame, classes))
    if current_unit is not None:
        sections.append("</section>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>label review</title>
<style>{_STYLE}</style></head>
<body data-page-id="{html.escape(page_id)}">
<header>
<h1>Label review</h1>
<p><span id="counter"></span> · <button id="export" type="button">Export decisions (CSV)</button>
for <code>gastro-dist pack ... --relabel FILE.csv</code>. Unfinished work is kept in this browser.</p>
<p class="keys">Keys: <kbd>→</kbd>/<kbd>n</kbd> next, <kbd>←</kbd>/<kbd>p</kbd> previous, <kbd>k</kbd> keep,
<kbd>x</kbd> exclude, <kbd>s</kbd> relabel to the suggested class, <kbd>1</kbd>..<kbd>9</kbd> relabel to class N
(to the given class: keep), <kbd>u</kbd> undo; a decision moves on to the next frame. Classes:</p>
<ol id="legend">{legend}</ol>
<p class="note">{html.escape(cam_note)}</p>
</header>
<main>{"".join(sections)}</main>
<script>{_SCRIPT}</script>
</body></html>
"""
    write_text_atomic(path, page)


def _unit_header(unit: ReviewUnit) -> str:
    title = (f"<h2>{html.escape(unit.title)}</h2><p>{unit.num_frames} frames in the predictions, "
             f"{unit.num_flagged} flagged</p>")
    others = unit.num_frames - unit.num_flagged
    if not others:
        return title
    cap = (f"; the first {len(unit.thumbnails)} are embedded (at most {MAX_PATIENT_THUMBNAILS} per patient)"
           if len(unit.thumbnails) < others else "")
    pictures = "".join(f'<figure><img src="{_data_uri(jpeg)}" alt="{html.escape(key)}">'
                       f"<figcaption>{html.escape(label)}</figcaption></figure>"
                       for key, label, jpeg in unit.thumbnails)
    return (f"{title}<details><summary>Its {others} frame{'s' * (others > 1)} not flagged{cap}</summary>"
            f'<div class="thumbs">{pictures}</div></details>')


def _frame_card(frame: ReviewFrame, classes: list[str]) -> str:
    roles = [" ".join(role for role, index in (("given", frame.given), ("suggested", frame.suggested)) if index == k)
             for k in range(len(classes))]
    bars = "".join(
        f'<tr class="{roles[k]}">'
        f"<td>{html.escape(name)}</td><td class=\"bar\"><span style=\"width:{100 * p:.1f}%\"></span></td>"
        f"<td>{p:.2f}</td></tr>" for k, (name, p) in enumerate(zip(classes, frame.probs)))
    buttons = " ".join(f'<button type="button" data-decision="relabel" data-class-index="{k}">'
                      f"→ {html.escape(name)}</button>" for k, name in enumerate(classes) if k != frame.given)
    cam = (f'<figure><img src="{_data_uri(frame.cam_jpeg)}" alt="Grad-CAM"><figcaption>Grad-CAM for '
           f"{html.escape(classes[frame.suggested])}</figcaption></figure>" if frame.cam_jpeg else "")
    frame_at = f" · frame {frame.frame_index}" if frame.frame_index is not None else ""
    return f"""<article class="frame" data-key="{html.escape(frame.key)}" data-source="{html.escape(frame.source)}"
 data-sha256="{html.escape(frame.sha256)}" data-frame-index="{'' if frame.frame_index is None else frame.frame_index}"
 data-given="{frame.given}" data-suggested="{frame.suggested}">
<div class="pictures"><figure><img src="{_data_uri(frame.jpeg)}" alt="{html.escape(frame.key)}">
<figcaption>as stored</figcaption></figure>{cam}</div>
<div class="facts"><p><b>#{frame.rank}</b> {html.escape(frame.source or frame.key)}{frame_at}</p>
<p>given <b>{html.escape(classes[frame.given])}</b> · suggested <b>{html.escape(classes[frame.suggested])}</b></p>
<p class="reason">{html.escape(frame.reasons)}</p>
<table>{bars}</table>
<p>Decision: <b class="status">undecided</b></p>
<p><button type="button" data-decision="keep">keep</button>
<button type="button" data-decision="exclude">exclude</button> relabel: {buttons}
<button type="button" data-decision="">undo</button></p></div></article>"""


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 24px 24px; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; z-index: 1; }
header p { margin: 4px 0; }
#legend { display: flex; flex-wrap: wrap; gap: 4px 16px; padding-left: 0; list-style: none; margin: 4px 0; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 4px; font-size: 90%; }
.note { color: #666; }
.frame { display: flex; gap: 16px; padding: 8px; margin: 8px 0; border: 2px solid #ddd; }
.frame.current { border-color: #1565c0; }
.frame.decided { background: #f3f8f3; }
.pictures { display: flex; gap: 8px; }
.pictures img { max-width: none; }
figure { margin: 0; }
figcaption { font-size: 80%; color: #555; }
.reason { color: #a00; }
table { border-collapse: collapse; }
td { padding: 1px 6px; font-size: 90%; }
tr.given td:first-child::after { content: " (given)"; }
tr.suggested td:first-child::after { content: " (suggested)"; }
tr.given.suggested td:first-child::after { content: " (given, suggested)"; }
.bar { width: 120px; }
.bar span { display: block; height: 10px; background: #1565c0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
"""

_SCRIPT = """
"use strict";
const cards = [...document.querySelectorAll(".frame")];
const classes = [...document.querySelectorAll("#legend [data-class]")].map(item => item.dataset.class);
const storageKey = "gastro-dist label review " + document.body.dataset.pageId;
const decisions = savedDecisions();
let current = 0;

function savedDecisions() {
  try {
    return JSON.parse(localStorage.getItem(storageKey)) || {};
  } catch (error) {  // not JSON: a start afresh beats a page that does nothing
    return {};
  }
}

function showDecision(card) {
  const taken = decisions[card.dataset.key];
  card.querySelector(".status").textContent =
    !taken ? "undecided" : taken.decision === "relabel" ? "relabel to " + taken.new_label : taken.decision;
  card.classList.toggle("decided", Boolean(taken));
}

function showCounter() {
  const decided = cards.filter(card => decisions[card.dataset.key]).length;
  document.getElementById("counter").textContent = decided + " of " + cards.length + " decided";
}

function select(index) {
  current = Math.max(0, Math.min(cards.length - 1, index));
  cards.forEach((card, i) => card.classList.toggle("current", i === current));
  if (!cards.length) return;
  cards[current].style.scrollMarginTop = document.querySelector("header").offsetHeight + 8 + "px";
  cards[current].scrollIntoView({block: "nearest"});
}

function decide(decision, newLabel = "") {
  const card = cards[current];
  if (!card) return;
  if (decision) decisions[card.dataset.key] = {decision: decision, new_label: newLabel};
  else delete decisions[card.dataset.key];
  localStorage.setItem(storageKey, JSON.stringify(decisions));
  showDecision(card);
  showCounter();
  if (decision) select(current + 1);
}

function relabel(classIndex) {
  const card = cards[current];
  if (card && classIndex === Number(card.dataset.given)) decide("keep");
  else decide("relabel", classes[classIndex]);
}

function csvCell(text) {
  return /[",\\r\\n]/.test(text) ? '"' + text.replaceAll('"', '""') + '"' : text;
}

function exportDecisions() {
  const lines = [["source", "sha256", "frame_index", "decision", "new_label", "key"]];
  for (const card of cards) {
    const taken = decisions[card.dataset.key] || {decision: "", new_label: ""};
    lines.push([card.dataset.source, card.dataset.sha256, card.dataset.frameIndex, taken.decision, taken.new_label,
                card.dataset.key]);
  }
  const text = "\\ufeff" + lines.map(line => line.map(csvCell).join(",")).join("\\r\\n") + "\\r\\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {type: "text/csv;charset=utf-8"}));
  link.download = "review_decisions.csv";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

document.addEventListener("keydown", event => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "ArrowRight" || key === "n") select(current + 1);
  else if (key === "ArrowLeft" || key === "p") select(current - 1);
  else if (key === "k") decide("keep");
  else if (key === "x") decide("exclude");
  else if (key === "u") decide("");
  else if (key === "s" && cards[current]) relabel(Number(cards[current].dataset.suggested));
  else if (/^[1-9]$/.test(key) && Number(key) <= classes.length) relabel(Number(key) - 1);
  else return;
  event.preventDefault();
});

document.addEventListener("click", event => {
  const card = event.target.closest(".frame");
  if (!card) return;
  select(cards.indexOf(card));
  const button = event.target.closest("button[data-decision]");
  if (!button) return;
  if (button.dataset.classIndex === undefined) decide(button.dataset.decision);
  else relabel(Number(button.dataset.classIndex));
});

document.getElementById("export").addEventListener("click", exportDecisions);
cards.forEach(showDecision);
showCounter();
select(Math.max(0, cards.findIndex(card => !decisions[card.dataset.key])));  // where the reviewer left off
"""
