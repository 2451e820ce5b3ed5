"""MODEL_CARD.md: what an evaluated model is, what it was trained and tested on, how well it did, and
what it must not be used for, under the headings of "Model Cards for Model Reporting" (Mitchell et
al. 2019), with the items of the CLAIM (2024) and TRIPOD+AI (2024) checklists that a run can answer,
and those only the study team can. Built as report blocks: evaluate writes it alone and as the
report's last section. Every fact comes from model.json, summary.json, config.yaml, index.json and
metrics.json; what they do not record is said to be unknown, never guessed."""

from __future__ import annotations

from datetime import date
from pathlib import Path


import gastro_dist
from gastro_dist.data.shard_index import MAX_REMOTE_INDEX_BYTES, SPLITS, ShardIndex
from gastro_dist.evaluation.report import Heading, Paragraph, Table
from gastro_dist.files import read_json_file, read_yaml_file
from gastro_dist.run_dir import ModelMeta, RunDir


def model_card_blocks(meta: ModelMeta, run_dir: RunDir, index: ShardIndex, result: dict) -> list:
    """The model card of a run evaluated as `result` (metrics.json's content) on shards `index`."""
    summary = run_dir.read_summary()
    config = _read_yaml(run_dir.config_yaml)
    packed = _read_index_json(index)
    details = result.get("details") or {}
    split = str(details.get("split", "test"))
    classes = list(meta.classes)
    blocks: list = [Heading(f"Model card: {meta.architecture}, {len(classes)} classes", level=1)]
    blocks += _model_details(meta, summary, config)
    blocks += _intended_use(classes)
    blocks += _factors()
    blocks += _metrics_section(result)
    blocks += _evaluation_data(result, split, index, classes)
    blocks += _training_data(index, packed, classes)
    blocks += _quantitative_analyses(result, split, classes)
    blocks += _ethics(packed)
    blocks += _caveats(result, index, packed, classes, split)
    blocks += _checklist(result)
    return blocks


# ----------------------------------------------------------------------------- sections
def _model_details(meta: ModelMeta, summary: dict, config: dict) -> list:
    system = summary.get("system") if isinstance(summary.get("system"), dict) else {}
    phases = summary.get("phases") if isinstance(summary.get("phases"), dict) else {}
    rows = [["Model", f"`{meta.architecture}` image classifier, pretrained weights: {meta.pretrained}"],
            ["Classes (output order)", ", ".join(f"`{name}`" for name in meta.classes)],
            ["Input", f"RGB image, shorter side resized to {round(meta.image_size / meta.eval_crop_ratio)} px, "
                      f"centre crop {meta.image_size} x {meta.image_size} px, normalised with mean {meta.mean} "
                      f"and std {meta.std}"],
            ["Output", f"one probability per class: softmax(logits / T), temperature T = {meta.temperature:.4f}"],
            ["Weights", f"{meta.source_checkpoint or 'final'} epoch of the last phase (best validation macro "
                        "accuracy), model.safetensors with model.json"],
            ["Software", f"gastro-dist {gastro_dist.__version__}, commit {system.get('git_commit') or 'unknown'}; "
                         + ", ".join(f"{name} {version}" for name, version in (system.get("versions") or {}).items()
                                     if version)],
            ["Card written", date.today().isoformat()]]
    blocks = [Heading("Model details"), Table(["Item", "Value"], rows)]

    phase_rows = []
    for name in ("head", "finetune"):
        planned = config.get(name) if isinstance(config.get(name), dict) else {}
        done = phases.get(name) if isinstance(phases.get(name), dict) else {}
        if not planned and not done:
            continue
        what = ("new head on the frozen backbone" if str(planned.get("unfreeze", "none")) == "none"
                else f"unfreezes {planned.get('unfreeze')} of the backbone")
        phase_rows.append([name, what, str(done.get("epochs", planned.get("epochs", "?"))),
                           str(done.get("best_epoch", "?")),
                           f"{planned.get('optimizer', '?')}, lr {planned.get('lr', '?')}, backbone lr "
                           f"{planned.get('backbone_lr', '?')}",
                           _percent(done.get("val_macro_accuracy")), _seconds(done.get("time_s"))])
    devices = system.get("devices") or []
    hardware = (f"{summary.get('world_size', '?')} process(es) on {summary.get('num_machines', '?')} machine(s), "
                f"devices: {', '.join(sorted(set(map(str, devices)))) or 'unknown'}; mixed precision "
                f"{summary.get('mixed_precision', '?')}; batch size {(config.get('data') or {}).get('batch_size', '?')} "
                "per process")
    blocks += [Heading("Training", level=3),
               Paragraph("Two-phase transfer learning: the new head is trained on the frozen backbone, then the "
                         "backbone is fine-tuned from the head's best weights; each phase keeps its epoch with the "
                         "best validation macro accuracy (mean of the per-class accuracies)."),
               Table(["Phase", "What trains", "Epochs", "Best epoch", "Optimiser", "Val macro accuracy", "Time"],
                     phase_rows or [["n/a", "summary.json has no phases", "", "", "", "", ""]]),
               Paragraph(f"Hardware: {hardware}.")]
    return blocks


def _intended_use(classes: list[str]) -> list:
    return [Heading("Intended use"),
            Paragraph("Research use: classifying single white-light gastroscopy images (stills, or frames of "
                      f"procedure videos) into {', '.join(f'`{name}`' for name in classes)}, to study "
                      "computer-aided decision support."),
            Paragraph("NOT FOR DIAGNOSIS. This model is not a medical device: it has not been validated "
                      "prospectively, in other centres or by a regulator. It must not be used to diagnose, rule out "
                      "or triage any patient. Every image it scores must still be read by an endoscopist, and "
                      "histopathology remains the reference for cancer."),
            Paragraph("Out of scope: any finding that is not one of the classes above (the model always answers "
                      "with one of them), other imaging (narrow-band imaging, chromoendoscopy, capsule "
                      "endoscopy, colonoscopy) unless such images were in the training data, and images whose "
                      "quality or processing differs from the training data.")]


def _factors() -> list:
    return [Heading("Factors"),
            Paragraph("What is known to change endoscopy classifiers' performance: the centre and its patient "
                      "population, the endoscope and video processor, the imaging mode, image quality (blur, "
                      "bubbles, mucus, light), the lesion's size and stage, and the patient's age and sex. The data "
                      "record none of these, so performance across them was not measured. What is reported: "
                      "every class separately, per image and per patient.")]


def _metrics_section(result: dict) -> list:
    boot = result.get("bootstrap") or {}
    intervals = (f"95% CIs with the {'patients' if boot.get('unit') == 'patient' else 'images'} as the independent "
                 f"units: exact for the proportions, from {boot.get('num_resamples')} bootstrap resamples for AUC, F1, "
                 "MCC and Brier score (the report's Methods)" if boot else "no CIs were computed")
    return [Heading("Metrics"),
            Paragraph("Per-class accuracy (the share of each class's images recognised: sensitivity), "
                      "specificity, PPV, NPV, F1 and AUC of each class against the rest, macro AUC, MCC, "
                      "cancer versus benign when a cancer class exists; calibration as the debiased expected "
                      f"calibration error and the Brier score; {intervals}. Definitions: the report's Methods.")]


def _training_data(index: ShardIndex, packed: dict, classes: list[str]) -> list:
    splits = [name for name in SPLITS if name in index.splits] + \
        sorted(name for name in index.splits if name not in SPLITS)
    counts = {name: index.per_class(name) for name in splits}
    rows = [[name, *[str(counts[split].get(name, 0)) for split in splits],
             str(sum(counts[split].get(name, 0) for split in splits))] for name in classes]
    rows.append(["all", *[str(index.count(split)) for split in splits], str(sum(map(index.count, splits)))])
    patients = []
    for split in splits:
        number = (((packed.get("splits") or {}).get(split) or {}).get("patients"))
        patients.append(str(number) if isinstance(number, int) else "unknown")
    rows.append(["patients (with an id)", *patients, ""])
    sources = [f"{what}: `{packed[key]}`" for key, what in (("source", "image folder"), ("manifest", "manifest"),
                                                              ("segments", "video segments"))
               if isinstance(packed.get(key), str) and packed.get(key)]
    totals = packed.get("totals") if isinstance(packed.get("totals"), dict) else {}
    videos = totals.get("videos_packed")
    text = ("Images were packed by `gastro-dist pack` from " + ("; ".join(sources) if sources else
                                                                 "source folders that index.json does not name")
            + ". Splits keep each patient, each file's exact bytes and each video in one split"
            + (f"; {videos} videos gave {totals.get('frames_from_videos')} frames" if isinstance(videos, int) and videos
               else "") + ".")
    if packed.get("pseudonymisation"):
        text += " Patient ids and paths are pseudonyms (keyed hashes)."
    return [Heading("Training data"), Paragraph(text),
            Table(["Class", *splits, "total"], rows)]


def _evaluation_data(result: dict, split: str, index: ShardIndex, classes: list[str]) -> list:
    skipped = (result.get("skipped_samples") or {}).get("count", 0)
    patient = result.get("patient_level")
    per_class = ", ".join(f"{name} {result['per_class'][name]['support']}" for name in classes)
    return [Heading("Evaluation data"),
            Paragraph(f"The `{split}` split: {result['num_samples']} images"
                      + (f" of {patient['num_patients']} patients" if patient else
                         (f" of {result['num_groups']} patients" if result.get("num_groups") else ""))
                      + f" ({per_class}), "
                      f"none of whose patients is in the training or validation split"
                      + (f"; {skipped} samples could not be evaluated (metrics.json, skipped_samples)" if skipped
                         else "") + ".")]


def _quantitative_analyses(result: dict, split: str, classes: list[str]) -> list:
    patient = (result.get("patient_level") or {}).get("metrics")
    columns = [("image", result)] + ([("patient", patient)] if patient else [])

    def cell(metrics: dict, key: tuple, fmt) -> str:
        value, interval = metrics, metrics.get("ci") or {}
        for part in key:
            value = (value or {}).get(part)
            interval = (interval or {}).get(part)
        return fmt(value) + (f" ({fmt(interval['lower'])} – {fmt(interval['upper'])})"
                             if isinstance(interval, dict) and "lower" in interval else "")

    rows = [["Accuracy", ("accuracy",), _percent], ["Balanced accuracy", ("balanced_accuracy",), _percent],
            *[[f"Accuracy: {name}", ("per_class_accuracy", name), _percent] for name in classes],
            ["Macro AUC", ("macro_auc",), _decimal], ["MCC", ("mcc",), _decimal]]
    if result.get("cancer_vs_benign"):
        rows += [[f"Cancer vs benign {name}", ("cancer_vs_benign", name), fmt]
                 for name, fmt in (("sensitivity", _percent), ("specificity", _percent), ("auc", _decimal))]
    rows += [["ECE (debiased)", ("ece_debiased",), _decimal], ["Brier score", ("brier",), _decimal]]
    blocks = [Heading("Quantitative analyses"),
              Paragraph(f"On the `{split}` split, 95% CIs in brackets."),
              Table(["Metric", *[f"Per {name}" for name, _ in columns]],
                    [[name, *[cell(metrics, key, fmt) for _, metrics in columns]] for name, key, fmt in rows])]
    majority = (result.get("baselines") or {}).get("majority")
    if majority:
        blocks.append(Paragraph(f"A classifier that always answers the most frequent training class scores "
                                f"accuracy {_percent(majority['accuracy'])}, balanced accuracy "
                                f"{_percent(majority['balanced_accuracy'])}."))
    scaling = result.get("temperature_scaling")
    if scaling:
        before, after = scaling["before"], scaling["after"]
        blocks += [Heading("Calibration", level=3),
                   Paragraph(f"Temperature T = {scaling['temperature']:.3f} "
                             + ("fitted on the validation split at the end of training. " if scaling.get("fit")
                                else "(none fitted: the network's softmax). ")
                             + f"Debiased ECE {_decimal(before['ece_debiased'])} before, "
                             f"{_decimal(after['ece_debiased'])} after; Brier score {_decimal(before['brier'])} "
                             f"before, {_decimal(after['brier'])} after.")]
    point = result.get("operating_point")
    if point:
        at = point["metrics"]
        blocks.append(Paragraph(f"Operating point: P({point['positive_class']}) >= {point['threshold']:.4f}, chosen "
                                f"on `{point['selected_on']}` for sensitivity {_percent(point['target_sensitivity'])}, "
                                f"gives sensitivity {_percent(at['sensitivity'])} and specificity "
                                f"{_percent(at['specificity'])} here."))
    return blocks


def _ethics(packed: dict) -> list:
    return [Heading("Ethical considerations"),
            Paragraph("Patient data: " + ("ids and paths were pseudonymised when packing; " if packed.get(
                "pseudonymisation") else "ids and paths are stored as given (not pseudonymised); ")
                      + "text burned into frames is not removed. Ethics approval and consent are for the study "
                      "team to record. A confident wrong answer can mislead a reader (automation bias): the "
                      "model's output is a second opinion at most. No demographic data were available, so "
                      "differences in performance between patient groups are unknown.")]


def _caveats(result: dict, index: ShardIndex, packed: dict, classes: list[str], split: str) -> list:
    support = {name: result["per_class"][name]["support"] for name in classes}
    share = {name: support[name] / max(1, result["num_samples"]) for name in classes}
    listed = ", ".join(f"{name} {support[name]} ({share[name]:.0%})" for name in classes)
    balance = (f"the `{split}` split has {listed}"
               + ("; equal numbers per class, as in the reference study's design" if len(set(support.values())) == 1
                  else ""))
    never = [f"findings other than {', '.join(f'`{name}`' for name in classes)} (the model has no 'other' answer)"]
    if "normal" not in " ".join(classes).lower():
        never.append("normal mucosa (no class for it)")
    empty = [name for name in classes if not index.per_class("train").get(name)] if "train" in index.splits else []
    if empty:
        never.append(f"any training image of {', '.join(empty)}")
    items = [
        "Single centre: the data record no centre, endoscope or processor; unless the source folders above span "
        "several centres, this is a single-centre result, and performance elsewhere is unknown until measured there.",
        f"Class balance: {balance}. PPV and NPV depend on how common each finding is: at the prevalence of a "
        "real clinic they differ from these figures; sensitivity and specificity transfer better.",
        "Never seen in training: " + "; ".join(never) + ".",
        f"{result['num_samples']} test images: the CIs show how little a small test set pins the figures down.",
        "The validation split chose the best epoch and fitted the temperature, so validation figures are "
        "optimistic; the test split was used for nothing but this evaluation.",
        "Each image is classified alone; procedure context, patient history and other frames are not used.",
    ]
    return [Heading("Caveats and recommendations"), *[Paragraph(f"- {item}") for item in items]]


def _checklist(result: dict) -> list:
    """The CLAIM 2024 and TRIPOD+AI 2024 items (by name) that apply to a classifier evaluated here."""
    pending = "to be completed by the study team"
    rows = [
        ["Data sources, dates, setting", "CLAIM, TRIPOD+AI", "Training data (folders as given); dates and setting: "
                                                          + pending],
        ["Eligibility criteria, inclusion and exclusion", "CLAIM, TRIPOD+AI", pending
         + "; images pack rejected or skipped are listed with reasons in the shards' rejected.jsonl and skipped.jsonl"],
        ["Reference standard (ground truth) and how labels were given", "CLAIM, TRIPOD+AI",
         "labels from class folders or the manifest; who labelled and how: " + pending],
        ["Data partitions, patient-level separation", "CLAIM, TRIPOD+AI", "Training data: splits by patient"],
        ["Sample size", "TRIPOD+AI", "Training data and Evaluation data (no sample size calculation was made)"],
        ["Missing or unusable data", "CLAIM, TRIPOD+AI",
         f"{(result.get('skipped_samples') or {}).get('count', 0)} samples skipped (metrics.json)"],
        ["Model, pre-processing, training procedure and hyperparameters", "CLAIM, TRIPOD+AI",
         "Model details, Training; full config in the run's config.yaml"],
        ["Performance measures with confidence intervals", "CLAIM, TRIPOD+AI", "Quantitative analyses"],
        ["Calibration", "TRIPOD+AI", "Quantitative analyses, Calibration"],
        ["Clinically meaningful threshold", "CLAIM, TRIPOD+AI",
         "Operating point" if result.get("operating_point") else "not chosen (evaluate --cancer-sensitivity)"],
        ["Comparison with a baseline", "CLAIM", "majority-class baseline (report: Baselines)"],
        ["Failure analysis", "CLAIM", "report: Grad-CAM of correct and misclassified images (evaluate --cam N)"],
        ["Fairness, subgroups", "TRIPOD+AI", "not assessed: no demographic data"],
        ["External validation", "CLAIM, TRIPOD+AI", "none: internal test split only"],
        ["Intended use, limitations", "CLAIM, TRIPOD+AI", "Intended use; Caveats and recommendations"],
        ["Code and model availability", "CLAIM, TRIPOD+AI", "Model details (version, commit)"],
    ]
    return [Heading("Reporting checklist"),
            Paragraph("Items of CLAIM (Checklist for Artificial Intelligence in Medical Imaging, 2024 update) and "
                      "TRIPOD+AI (2024) that apply to this model, and where this card answers them."),
            Table(["Item", "Checklist", "Where"], rows)]


# ----------------------------------------------------------------------------- helpers
def _read_yaml(path: Path) -> dict:
    try:
        data = read_yaml_file(Path(path), str(path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_index_json(index: ShardIndex) -> dict:
    """index.json's descriptive fields (sources, patients per split, totals); {} when unreadable."""
    try:
        path = Path(index.root) / "index.json"
        data = read_json_file(path, max_bytes=MAX_REMOTE_INDEX_BYTES)
    except (OSError, ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _percent(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _decimal(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.3f}"


def _seconds(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.0f} s"
