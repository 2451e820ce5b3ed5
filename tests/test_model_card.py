"""MODEL_CARD.md: the Model Cards headings, the not-for-diagnosis statement, data per class and split,
training facts from summary.json and config.yaml, metrics with CIs per image and per patient,
calibration, limitations and the CLAIM / TRIPOD+AI items; nothing unknown is made up."""

import json

import numpy as np
import yaml

from gastro_dist.data.shard_index import ShardFile, ShardIndex
from gastro_dist.evaluation.metrics import evaluate_predictions, patient_level
from gastro_dist.evaluation.model_card import model_card_blocks
from gastro_dist.evaluation.report import render_html, render_markdown
from gastro_dist.run_dir import ModelMeta, RunDir

CLASSES = ["chronic_gastritis", "gastric_cancer", "gastric_ulcer"]
MITCHELL_HEADINGS = ["Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                     "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"]


def fake_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    meta = ModelMeta(architecture="resnet50", classes=CLASSES, image_size=224, eval_crop_ratio=0.875,
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], pretrained="imagenet",
                     source_checkpoint="finetune-best", temperature=1.8)
    run.summary_json.write_text(json.dumps({
        "world_size": 4, "num_machines": 1, "mixed_precision": "bf16",
        "system": {"devices": ["NVIDIA H100"] * 4, "git_commit": "abc123", "versions": {"torch": "2.14.1"}},
        "phases": {"head": {"epochs": 5, "best_epoch": 4, "val_macro_accuracy": 0.81, "time_s": 120.0},
                   "finetune": {"epochs": 20, "best_epoch": 17, "val_macro_accuracy": 0.9, "time_s": 2400.0}},
        "calibration": {"temperature": 1.8, "num_samples": 300}}))
    run.config_yaml.write_text(yaml.safe_dump({
        "data": {"batch_size": 64},
        "head": {"epochs": 5, "optimizer": "adamw", "lr": 1e-3, "backbone_lr": 0.0, "unfreeze": "none"},
        "finetune": {"epochs": 20, "optimizer": "adamw", "lr": 1e-4, "backbone_lr": 1e-5, "unfreeze": "all"}}))
    shards = tmp_path / "shards"
    shards.mkdir()
    counts = {"train": {"chronic_gastritis": 1600, "gastric_cancer": 1700, "gastric_ulcer": 1650},
              "val": {"chronic_gastritis": 180, "gastric_cancer": 190, "gastric_ulcer": 185},
              "test": {name: 150 for name in CLASSES}}
    (shards / "index.json").write_text(json.dumps({
        "source": "/data/hospital_a/gastroscopy", "manifest": "/data/hospital_a/labels.csv",
        "splits": {split: {"patients": patients} for split, patients in (("train", 900), ("val", 100), ("test", 90))},
        "totals": {"videos_packed": 0}, "pseudonymisation": None}))
    index = ShardIndex(root=shards, classes=CLASSES,
                       splits={split: (ShardFile(shards / f"{split}-000000.tar", sum(c.values())),)
                               for split, c in counts.items()},
                       per_class_counts=counts)
    return meta, run, index


def evaluation_result():
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(3), 150)
    logits = rng.normal(size=(450, 3))
    logits[np.arange(450), y_true] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = np.arange(450) // 5
    result = evaluate_predictions(y_true, probs, CLASSES, groups, num_bootstrap=50, positive_class="gastric_cancer")
    cases = patient_level(y_true, probs, groups)
    patient = evaluate_predictions(cases["labels"], cases["probs"], CLASSES, cases["groups"], num_bootstrap=50,
                                   positive_class="gastric_cancer")
    calibration = {"ece": 0.05, "ece_debiased": 0.03, "ece_debiased_ci": None, "brier": 0.4, "brier_ci": None,
                   "nll": 0.7}
    return {**result, "details": {"split": "test"},
            "patient_level": {"aggregation": "mean", "num_patients": 90, "num_cases": len(cases["labels"]),
                              "frames_per_case": {"min": 5, "median": 5.0, "max": 5}, "metrics": patient},
            "temperature_scaling": {"temperature": 1.8, "fit": {"temperature": 1.8},
                                    "before": {**calibration, "ece_debiased": 0.08}, "after": calibration},
            "baselines": {"majority": {"accuracy": 1 / 3, "balanced_accuracy": 1 / 3}},
            "skipped_samples": {"count": 2}}


def test_model_card_holds_the_facts_under_the_model_card_headings(tmp_path):
    meta, run, index = fake_run(tmp_path)
    result = evaluation_result()
    blocks = model_card_blocks(meta, run, index, result)
    markdown = render_markdown(blocks)

    assert markdown.startswith("# Model card: resnet50, 3 classes")
    positions = [markdown.index(f"## {heading}\n") for heading in MITCHELL_HEADINGS]
    assert positions == sorted(positions)
    assert "NOT FOR DIAGNOSIS" in markdown and "must not be used to diagnose" in markdown
    # Data per class and split, patients and the source folders as given.
    assert "| Class | train | val | test | total |" in markdown
    assert "| gastric_cancer | 1700 | 190 | 150 | 2040 |" in markdown
    assert "| patients (with an id) | 900 | 100 | 90 |  |" in markdown
    assert "`/data/hospital_a/gastroscopy`" in markdown and "`/data/hospital_a/labels.csv`" in markdown
    # Training: phases, epochs, hardware.
    assert "| finetune | unfreezes all of the backbone | 20 | 17 | adamw, lr 0.0001, backbone lr 1e-05 | 90.0% |" in markdown
    assert "4 process(es) on 1 machine(s), devices: NVIDIA H100; mixed precision bf16" in markdown
    assert "temperature T = 1.8000" in markdown and "commit abc123" in markdown
    # Metrics with CIs, per image and per patient.
    assert "| Metric | Per image | Per patient |" in markdown
    ci = result["ci"]["accuracy"]
    assert (f"| Accuracy | {100 * result['accuracy']:.1f}% ({100 * ci['lower']:.1f}% – {100 * ci['upper']:.1f}%) |"
            in markdown)
    assert "Debiased ECE 0.080 before, 0.030 after" in markdown
    # Limitations: single centre, class balance, never seen; the checklists.
    assert "Single centre" in markdown and "equal numbers per class" in markdown
    assert "normal mucosa (no class for it)" in markdown
    assert "CLAIM" in markdown and "TRIPOD+AI" in markdown and "to be completed by the study team" in markdown
    assert "2 samples skipped" in markdown
    assert "<h2>Intended use</h2>" in render_html(blocks, "card", tmp_path)


def test_model_card_says_unknown_rather_than_guessing(tmp_path):
    meta, run, index = fake_run(tmp_path)
    run.summary_json.unlink()
    run.config_yaml.write_text(": not yaml :")
    (index.root / "index.json").write_text("[]")
    result = {**evaluation_result(), "patient_level": None, "temperature_scaling": None, "baselines": None}
    markdown = render_markdown(model_card_blocks(meta, run, index, result))
    assert "commit unknown" in markdown and "| patients (with an id) | unknown | unknown | unknown |  |" in markdown
    assert "source folders that index.json does not name" in markdown
    assert "| Metric | Per image |\n" in markdown
