"""Command line: parses arguments and calls library functions, nothing more. Handlers import their
modules lazily (`--help` and the data commands never import torch); errors are one line on stderr,
exit status 1 for a failed run and 2 for a usage error (README, "Robustness")."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gastro_dist import PREEMPT_EXIT_CODE, Preempted, UserError, __version__
from gastro_dist.benchmark import add_bench_commands


# ---------------------------------------------------------------- data commands
def _cmd_synth(args: argparse.Namespace) -> int:
    from gastro_dist.data.synth import generate_dataset

    generate_dataset(
        out_dir=args.out,
        per_class=args.per_class,
        seed=args.seed,
        size_range=tuple(args.size_range),
        images_per_patient=tuple(args.images_per_patient),
        style=args.style,
        workers=args.workers,
    )
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from gastro_dist.data.pack import PackSettings, pack_dataset

    if args.folds is not None and args.val_fraction is not None:
        raise UserError("--folds and --val-fraction exclude each other: with folds, each fold is the validation "
                        "split once; leave out --val-fraction")
    settings = PackSettings(
        val_fraction=PackSettings.val_fraction if args.val_fraction is None else args.val_fraction,
        test_per_class=args.test_per_class,
        test_fraction=args.test_fraction,
        folds=args.folds,
        resize_short=args.resize_short,
        input_size=args.input_size,
        quality=args.quality,
        shard_size=args.shard_size,
        workers=args.workers,
        seed=args.seed,
        max_file_mb=args.max_file_mb,
        video_fps=args.video_fps,
        near_duplicate_bits=args.near_duplicate_bits,
        blur_threshold=args.drop_blurry,
        max_frames_per_video=args.max_frames_per_video,
        max_video_mb=args.max_video_mb,
    )
    result = pack_dataset(
        src=args.src,
        out_dir=args.out,
        settings=settings,
        manifest=args.manifest,
        class_map=args.class_map,
        segments=args.segments,
        pseudonym_key_file=args.pseudonymise,
        relabel=args.relabel,
    )
    return 0 if result.packed > 0 else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from gastro_dist.data.verify import verify_shards

    problems = verify_shards(args.dir) if args.max_member_mb is None else verify_shards(args.dir, args.max_member_mb)
    return 1 if problems else 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic endoscopy-like dataset (class folders + manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives byte-identical images")
    p.add_argument("--size-range", type=int, nargs=2, default=(640, 1280), metavar=("MIN_W", "MAX_W"),
                   help="frame width range in pixels (height follows a 5:4 or 4:3 aspect)")
    p.add_argument("--images-per-patient", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                   help="frames per synthetic patient, drawn in this range")
    p.add_argument("--style", default="default", choices=("default", "alt"),
                   help="rendering style: 'alt' has another palette and optics, for generalisation checks")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("pack", help="validate images, videos and DICOM files and pack them into WebDataset shards "
                                    "with patient-grouped splits")
    p.add_argument("src", type=Path, help="input tree: one folder per class, or any tree with --manifest / --segments")
    p.add_argument("--out", type=Path, required=True, help="shard folder to write")
    p.add_argument("--manifest", type=Path, default=None, help="CSV with path,label[,patient_id] (paths relative to SRC)")
    p.add_argument("--segments", type=Path, default=None,
                   help="CSV with video,start_s,end_s,label[,patient_id]: labelled parts of videos (paths relative "
                        "to SRC); with or without --manifest, only the listed rows are packed")
    p.add_argument("--class-map", type=Path, default=None,
                   help="YAML/JSON mapping folder names (or relative folder paths) to class names; unmapped folders are skipped")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the non-test images per class in the validation split, whole patients "
                        "(default 0.1; not with --folds)")
    p.add_argument("--test-per-class", type=int, default=None, help="exactly N test images per class (the study used 150)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="test share when --test-per-class is not given")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="cross-validation: every non-test image goes to one of K folds (whole patients, each fold "
                        "with its share of every class) instead of train and val; the test split stays as without "
                        "--folds; train with data.fold=N, or every fold with `gastro-dist cv`")
    p.add_argument("--resize-short", type=int, default=None,
                   help="store the shorter side at PX (default: what --input-size needs; 0 keeps originals)")
    p.add_argument("--input-size", type=int, default=224, help="model input size the shards are meant for (224, 299)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split assignment and shard order")
    p.add_argument("--max-file-mb", type=float, default=512.0,
                   help="images and DICOM files larger than this many MB (10^6 bytes) are rejected without being "
                        "read; so are DICOMs whose deflated data set or one decoded frame would expand past it")
    p.add_argument("--video-fps", type=float, default=1.0,
                   help="frames sampled per second of video or multi-frame DICOM")
    p.add_argument("--near-duplicate-bits", type=int, default=3,
                   help="a sampled frame whose 64-bit perceptual hash differs from the last kept frame's in fewer "
                        "bits is dropped (0 keeps every sampled frame)")
    p.add_argument("--drop-blurry", type=float, nargs="?", const=50.0, default=None, metavar="VARIANCE",
                   help="drop dark frames and frames whose variance of the Laplacian (on a 256-px grey copy) is below "
                        "VARIANCE (50 when given without a value)")
    p.add_argument("--max-frames-per-video", type=int, default=10_000,
                   help="a video (or segment, or multi-frame DICOM) that would give more sampled frames is rejected")
    p.add_argument("--max-video-mb", type=float, default=20_000.0,
                   help="videos larger than this many MB are rejected (videos are streamed, never held in memory)")
    p.add_argument("--pseudonymise", type=Path, default=None, metavar="KEYFILE",
                   help="write every patient id and path as a keyed hash (HMAC-SHA256) of it; the key file stays "
                        "with you (default: the file named by $GASTRO_DIST_PSEUDONYM_KEY_FILE, if set)")
    p.add_argument("--relabel", type=Path, default=None, metavar="DECISIONS",
                   help="a reviewer's decisions (CSV source,sha256,decision[,new_label]; decision keep, relabel or "
                        "exclude), e.g. label-issues' label_issues.csv filled in: applied where source and sha256 "
                        "match an input, the others listed in OUT/relabel_unmatched.jsonl")
    p.set_defaults(handler=_cmd_pack)

    p = sub.add_parser("verify", help="re-read every shard and check it against index.json")
    p.add_argument("dir", help="the --out folder of a finished `gastro-dist pack`, or its URL (https://, s3://, gs://)")
    p.add_argument("--max-member-mb", type=int, default=None,
                   help="largest shard member read (default: the training default, data.max_member_mb)")
    p.set_defaults(handler=_cmd_verify)


# ---------------------------------------------------------------- training
def _cmd_train(args: argparse.Namespace) -> int:
    from gastro_dist.config import load_config
    from gastro_dist.training.trainer import check_training, train

    config = load_config(args.config, args.overrides)
    if args.check:
        processes = args.processes if args.processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if processes < 1:
            raise UserError("--processes must be 1 or more")
        print(check_training(config, shards_dir=args.shards, run_dir=args.out, num_processes=processes))
        return 0
    train(config, shards_dir=args.shards, run_dir=args.out)
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from gastro_dist.models.backbones import download_weights

    for path in download_weights(args.models):
        print(path)
    return 0


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="two-phase transfer learning (head on frozen backbone, then fine-tuning)",
                       description="Runs alone, or under `accelerate launch [flags] -m gastro_dist train ...`. "
                                   "Re-running with the same --out resumes from its newest checkpoint.")
    p.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/resnet50.yaml")
    p.add_argument("--shards", required=True,
                   help="folder written by `gastro-dist pack`, or its URL (https://, s3://, gs://; shards/README.md)")
    p.add_argument("--out", type=Path, required=True, help="run folder (created; resumed when it holds checkpoints)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. head.epochs=2 data.batch_size=64")
    p.add_argument("--check", action="store_true",
                   help="check the config, shards, pretrained weights, run folder and batch size against the processes, "
                        "then stop: exit 0 and one line when all is well, exit 2 and what to fix when not")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="with --check: the processes the run will have (default: WORLD_SIZE, else 1)")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("weights", help="manage pretrained weights")
    weights_sub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    d = weights_sub.add_parser("download", help="fetch pretrained weights into the local cache (needs internet): "
                               "torchvision's into the torch hub cache, timm:NAME's into the Hugging Face hub cache",
                               epilog="example: gastro-dist weights download resnet50 timm:convnext_tiny.fb_in22k\n"
                                      "then copy the printed files or folders to the same cache on the cluster")
    d.add_argument("models", nargs="+", metavar="MODEL", help="torchvision names (resnet50) or timm:NAME")
    d.set_defaults(handler=_cmd_weights_download)


# ---------------------------------------------------------------- evaluation and use of a run
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.evaluate import evaluate_run

    evaluate_run(args.run, args.shards, args.out, split=args.split, checkpoint=args.checkpoint,
                 num_bootstrap=args.bootstrap, seed=args.seed, cancer_sensitivity=args.cancer_sensitivity,
                 positive_class=args.positive_class, cam_misclassified=args.cam_misclassified,
                 batch_size=args.batch_size, num_workers=args.workers, track=not args.no_track,
                 patient_aggregation=args.patient_aggregation)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from gastro_dist.compare import compare_configs, compare_predictions

    if bool(args.configs) == bool(args.predictions):
        raise UserError("give --configs (train and evaluate each) or --predictions (models evaluated already), "
                        "one of the two")
    if args.predictions:
        named = dict(item.partition("=")[::2] for item in args.predictions)
        if len(named) != len(args.predictions) or not all(name and path for name, path in named.items()):
            raise UserError("--predictions takes distinct NAME=PATH pairs, e.g. r50=runs/cv-r50/oof_predictions.csv")
        compare_predictions({name: Path(path) for name, path in named.items()}, args.out,
                            num_bootstrap=args.bootstrap)
        return 0
    if args.shards is None:
        raise UserError("--configs needs --shards, the shard folder every config trains and is evaluated on")
    configs = [Path(part) for item in args.configs for part in item.split(",") if part]
    compare_configs(configs, args.shards, args.out, overrides=args.overrides, split=args.split,
                    num_bootstrap=args.bootstrap, track=not args.no_track)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.evaluate import cam_files
    from gastro_dist.evaluation.inference import check_output_folder, load_trained_model, predict_files

    trained = load_trained_model(args.run, args.checkpoint)
    if args.cam:
        check_output_folder(args.cam, args.inputs, "--cam")  # before the CSV is written
    counts = predict_files(trained, args.inputs, args.out, batch_size=args.batch_size, tta=args.tta)
    print(f"{counts['predicted']} images predicted, {counts['errors']} unreadable: {args.out}")
    failed = []
    if args.cam:
        files = [p for p in args.inputs if Path(p).is_file() and Path(p).suffix != ".tar"]
        _, failed = cam_files(trained, files, args.cam)
    return 1 if counts["errors"] or failed else 0


def _cmd_cam(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.evaluate import cam_files
    from gastro_dist.evaluation.inference import load_trained_model

    trained = load_trained_model(args.run, args.checkpoint)
    _, failed = cam_files(trained, args.images, args.out, class_name=args.class_name)
    return 1 if failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.export import check_export, export_model
    from gastro_dist.evaluation.inference import load_trained_model

    trained = load_trained_model(args.run, args.checkpoint)
    path = export_model(trained.model, args.format, args.out, input_size=trained.image_size, classes=trained.classes,
                        mean=trained.meta.mean, std=trained.meta.std, output=args.output,
                        metadata=trained.meta.export_metadata(), temperature=trained.temperature)
    try:
        difference = check_export(trained.model, path, args.format, trained.image_size)
    except RuntimeError as err:
        raise UserError(f"the exported model does not match PyTorch: {err}") from None
    print(f"{path} (+ {path}.json): max difference to PyTorch {difference:.2e}")
    return 0


def _cmd_predict_video(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.inference import load_trained_model
    from gastro_dist.evaluation.video_predict import VideoSettings, predict_videos
    from gastro_dist.evaluation.video_timeline import FindingRules, Smoothing

    settings = VideoSettings(fps=args.fps, smoothing=Smoothing(args.smoothing, args.window_s),
                             findings=FindingRules(args.threshold, args.min_duration_s, args.merge_gap_s),
                             annotate=args.annotate, cam_every=args.cam_every, batch_size=args.batch_size,
                             queue_frames=args.queue_frames, idle_timeout_s=args.idle_timeout_s,
                             realtime=args.realtime)
    trained = load_trained_model(args.run, args.checkpoint)
    results = predict_videos(trained, args.videos, args.out, settings, backend=args.backend, onnx_file=args.onnx,
                             live=args.live, report=lambda line: print(line, file=sys.stderr))
    for result in results:
        if result.status != "failed":
            print(f"{result.name}: {result.num_predicted} frames predicted, {len(result.findings)} findings")
    print(f"frames.csv, findings.csv, videos.csv and summary.html in {args.out}")
    return 1 if any(result.status == "failed" for result in results) else 0


def add_evaluation_commands(sub: argparse._SubParsersAction) -> None:
    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", type=Path, required=True, help="a finished training run folder")
        p.add_argument("--checkpoint", default="best", help="best (default), last, or a weights file / checkpoint folder")

    p = sub.add_parser("evaluate", help="clinical metrics per image and per patient with patient-level CIs, "
                                        "predictions.csv, a report and MODEL_CARD.md")
    run_args(p)
    p.add_argument("--shards", required=True, help="shard folder (`gastro-dist pack --out`), or its URL")
    p.add_argument("--split", default="test", choices=("test", "val", "train"), help="split to evaluate")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, predictions.csv, report.md/html, PNGs")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--cancer-sensitivity", type=float, default=None, metavar="S",
                   help="choose the cancer threshold on the val split that reaches sensitivity S; report the split at it")
    p.add_argument("--positive-class", default=None,
                   help="class of the cancer-versus-rest view (default: gastric_cancer when the model has it)")
    p.add_argument("--cam", "--cam-misclassified", dest="cam_misclassified", type=int, default=0, metavar="N",
                   help="Grad-CAM panels in the report's gallery: of each class, the N most confident correct images "
                        "and the N most confident mistakes")
    p.add_argument("--patient-aggregation", choices=("mean", "max"), default="mean",
                   help="a patient's probabilities in the per-patient metrics: the mean over its frames, or for "
                        "the positive class the largest (the other classes share the rest)")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes reading the shards, per process")
    p.add_argument("--no-track", action="store_true",
                   help="do not add the results to the training run's trackers (RUN/tracking.json)")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("compare", help="train and evaluate several configs on the same shards: the study's table, "
                                       "and paired tests of every two models",
                       description="With --predictions, compares models evaluated already (e.g. the cv runs of "
                                   "several configs, by their oof_predictions.csv), training nothing.")
    p.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                   help="YAML configs, one run each: a.yaml b.yaml (a.yaml,b.yaml too, as slurm/compare.sbatch takes them)")
    p.add_argument("--predictions", nargs="+", default=None, metavar="NAME=PATH",
                   help="models evaluated already: an `evaluate` --out folder or a predictions CSV per model")
    p.add_argument("--shards", type=Path, default=None, help="shard folder (`gastro-dist pack --out`); with --configs")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for one run per config and comparison.md / comparison.json")
    p.add_argument("--split", default="test", choices=("test", "val"), help="split the models are compared on")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    p.add_argument("--no-track", action="store_true", help="do not add the evaluations to the runs' trackers")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every config")
    p.set_defaults(handler=_cmd_compare)

    p = sub.add_parser("predict", help="predict image files, folders or shards into a CSV",
                       description="Exit status 1 when some input could not be read (its CSV row carries the "
                                   "error) or got no overlay; every other input is still predicted.")
    run_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or .tar shards")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV to write (not an input, nor an image name inside an input folder)")
    p.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--cam", type=Path, default=None, metavar="DIR", help="also write Grad-CAM overlays of image files here")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("predict-video", help="predict procedure videos or a live stream frame by frame: smoothed "
                                             "probabilities, findings as time segments, an annotated copy",
                       description="Writes OUT/frames.csv (a row per predicted frame: raw and smoothed probabilities), "
                                   "OUT/findings.csv (time segments where a class's smoothed probability stays above "
                                   "--threshold), OUT/videos.csv (a row per video: frames decoded, predicted, dropped, "
                                   "damage, speed), OUT/summary.html, and with --annotate OUT/NAME.annotated.mp4. "
                                   "URLs (rtsp://, udp://, ...) and named pipes are live: when the model falls behind, "
                                   "the oldest waiting frames are dropped and counted; Ctrl-C or the stream's end "
                                   "closes the outputs. Exit status 1 when some video gave no prediction.")
    run_args(p)
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, named pipes or stream URLs")
    p.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    p.add_argument("--fps", type=float, default=None, help="frames predicted per second of video (default: every frame)")
    p.add_argument("--smoothing", choices=("ema", "centred", "none"), default="ema",
                   help="ema: causal, no latency added; centred: latency --window-s / 2, not for live input")
    p.add_argument("--window-s", type=float, default=1.0,
                   help="centred: the window's width; ema: twice its time constant")
    p.add_argument("--threshold", type=float, default=0.5, help="a finding: smoothed probability above this")
    p.add_argument("--min-duration-s", type=float, default=1.0, help="shorter findings are left out")
    p.add_argument("--merge-gap-s", type=float, default=1.0, help="findings of a class this close are merged")
    p.add_argument("--annotate", action="store_true",
                   help="write an annotated copy of each video (predicted class, a bar per class)")
    p.add_argument("--cam-every", type=int, default=0, metavar="K",
                   help="with --annotate: a Grad-CAM overlay on every K-th predicted frame")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="PyTorch (bf16 on CUDA, float32 on CPU) or ONNX Runtime on --onnx")
    p.add_argument("--onnx", type=Path, default=None, metavar="FILE",
                   help="with --backend onnx: the file `gastro-dist export --format onnx` wrote from --run")
    p.add_argument("--batch-size", type=int, default=8,
                   help="frames per forward pass (live: at most; the frames waiting are taken at once)")
    p.add_argument("--live", action="store_true", help="read files as they grow (a recording still being written)")
    p.add_argument("--realtime", action="store_true",
                   help="read files at their own frame rate, as a live feed: what would be dropped and how late "
                        "predictions come on this machine")
    p.add_argument("--queue-frames", type=int, default=16,
                   help="decoded frames waiting for the model at most; live input drops the oldest beyond")
    p.add_argument("--idle-timeout-s", type=float, default=30.0,
                   help="live input: no frame for this long ends the stream")
    p.set_defaults(handler=_cmd_predict_video)

    p = sub.add_parser("cam", help="Grad-CAM heatmap overlays as PNG",
                       description="Writes OUT/STEM_cam.png per image (inputs sharing a stem get a digest of their "
                                   "path added). An unreadable image gets one error line and the rest go on; "
                                   "exit status 1 if any image got no overlay.")
    run_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", type=Path, required=True, help="folder for the overlays")
    p.add_argument("--class", dest="class_name", default=None, help="explain this class instead of the predicted one")
    p.set_defaults(handler=_cmd_cam)

    p = sub.add_parser("export", help="export to ONNX or TorchScript with a JSON sidecar")
    run_args(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True, help="file format to write")
    p.add_argument("--out", type=Path, required=True, help="model file to write (a .json sidecar goes next to it)")
    p.add_argument("--output", choices=("probabilities", "logits"), default="probabilities",
                   help="what the exported model returns")
    p.set_defaults(handler=_cmd_export)


# ---------------------------------------------------------------- cross-validation
def _cmd_cv(args: argparse.Namespace) -> int:
    from gastro_dist.cv import cross_validate

    cross_validate(args.config, args.shards, args.out, overrides=args.overrides, folds=args.folds,
                   collect=args.collect, num_bootstrap=args.bootstrap, seed=args.seed, track=not args.no_track)
    return 0


def add_cv_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="K-fold cross-validation on shards packed with --folds K: a run per fold, "
                                  "out-of-fold and test metrics, their spread across folds, the fold ensemble",
                       description="Trains OUT/fold-N with data.fold=N for each chosen fold (one after the other), "
                                   "evaluates it on fold N (out-of-fold) and on the test split, and once every fold "
                                   "is done writes OUT/cv.json and OUT/cv.md. Re-running resumes unfinished folds "
                                   "and skips finished ones. On SLURM: slurm/cv.sbatch, one fold per array task.")
    p.add_argument("--config", type=Path, required=True, help="YAML config, the same for every fold")
    p.add_argument("--shards", required=True, help="shard folder packed with `gastro-dist pack --folds K`, or its URL")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the fold runs (OUT/fold-0 ...), cv.json, cv.md and the pooled predictions")
    p.add_argument("--folds", default="all", metavar="all|N,M",
                   help="folds to train and evaluate now, e.g. 0,2 (the summary waits until all are done)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: evaluate the finished folds not evaluated yet and write the summary "
                        "(fails if a fold has no finished run)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the patient-level 95%% CIs of each evaluation, the pooled "
                        "out-of-fold metrics and the ensemble (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--no-track", action="store_true", help="do not add the evaluations to the fold runs' trackers")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every fold (not data.fold: --folds chooses the folds)")
    p.set_defaults(handler=_cmd_cv)


# ---------------------------------------------------------------- label review
def _cmd_label_issues(args: argparse.Namespace) -> int:
    from gastro_dist.evaluation.label_issues import cv_inputs, find_label_issues

    if (args.cv is None) == (args.predictions is None):
        raise UserError("pass --predictions OOF.csv --shards S, or --cv RUN (a cv folder), not both")
    if args.cv is not None:
        predictions, shards = cv_inputs(args.cv, args.shards)
    elif args.shards is None:
        raise UserError("--predictions needs --shards: the pack the predictions were made on")
    else:
        predictions, shards = args.predictions, args.shards
    find_label_issues(predictions, shards, args.out, near_duplicate_bits=args.near_duplicate_bits, run=args.run)
    return 0


def add_label_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label-issues", help="likely mislabelled frames (cleanlab on out-of-fold predictions) and "
                                            "frames under two labels, for a reviewer; pip install 'gastro-dist[labels]'",
                       description="Writes OUT/label_issues.csv (a row per flagged frame, a patient's frames together, "
                                   "with decision and new_label columns for `pack --relabel`), OUT/summary.json "
                                   "(counts, cleanlab's noise estimate per class pair) and OUT/review.html (an offline "
                                   "page to decide on each frame and export the decisions as a CSV for `pack "
                                   "--relabel`). Refuses in-sample predictions "
                                   "(frames the predicting model trained on): they hide label errors.")
    p.add_argument("--predictions", type=Path, default=None, metavar="CSV",
                   help="out-of-sample predictions: cv's oof_predictions.csv, or evaluate's predictions.csv of a "
                        "held-out split")
    p.add_argument("--shards", default=None, help="the pack the predictions were made on (with --cv: cv.json's)")
    p.add_argument("--cv", type=Path, default=None, metavar="RUN",
                   help="a cv --out folder: its oof_predictions.csv and the shards cv.json names")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for label_issues.csv, summary.json and review.html")
    p.add_argument("--run", type=Path, default=None,
                   help="a run trained on these classes: review.html shows its Grad-CAM for each frame's suggested "
                        "class")
    p.add_argument("--near-duplicate-bits", type=int, default=3,
                   help="frames whose 64-bit perceptual hashes differ in fewer bits are the same picture "
                        "(0: exact duplicates only)")
    p.set_defaults(handler=_cmd_label_issues)


# ---------------------------------------------------------------- config
def _cmd_config_show(args: argparse.Namespace) -> int:
    from gastro_dist.config import describe_config, load_config

    print(describe_config(load_config(args.config, args.overrides)))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from gastro_dist.config import load_config

    load_config(args.config, args.overrides)
    print(f"{args.config}: OK")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from gastro_dist.tune import tune

    # Each worker --workers-here starts runs this search with one worker and no --final-test.
    worker_argv = ["tune", "--config", str(args.config), "--shards", args.shards, "--out", str(args.out),
                   "--trials", str(args.trials), "--seed", str(args.seed), "--pruner", args.pruner,
                   *(["--space", str(args.space)] if args.space else []),
                   *(["--storage", args.storage] if args.storage else []), *(["--cv"] if args.cv else []),
                   *args.overrides]
    tune(args.config, args.shards, args.out, args.trials, space_path=args.space, storage=args.storage,
         workers_here=args.workers_here, seed=args.seed, pruner=args.pruner, cv=args.cv, final_test=args.final_test,
         overrides=args.overrides, worker_argv=worker_argv)
    return 0


def add_tune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter search with Optuna: trials as training runs, pruned on val, "
                                    "shared by any number of workers (README, \"Hyperparameter search\")",
                       description="Re-running with the same --out continues the study up to --trials. "
                                   "Trials read the train and val splits only; the test split is read only by --final-test.")
    p.add_argument("--config", type=Path, required=True, help="base YAML config the search varies")
    p.add_argument("--shards", required=True, help="folder written by `gastro-dist pack` (with --folds K for --cv)")
    p.add_argument("--out", type=Path, required=True, help="study folder: trial-NNNN runs, tune.json/md/html, best.yaml")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials the study should have (finished or pruned)")
    p.add_argument("--space", type=Path, default=None, help="search space YAML (default: configs/search/tune_space.yaml)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a journal file path, or an RDB URL (sqlite:///, postgresql://) "
                        "(default: OUT/study.journal)")
    p.add_argument("--workers-here", type=int, default=1, metavar="K", help="worker processes on this machine")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"), help="Optuna pruner")
    p.add_argument("--cv", action="store_true", help="objective: mean over the pack's folds (shards packed with --folds K)")
    p.add_argument("--final-test", action="store_true",
                   help="after the search, train best.yaml once into OUT/final and evaluate it on the test split")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the base config")
    p.set_defaults(handler=_cmd_tune)


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check a training config")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", help="print the resolved config, each key with its meaning and default",
        epilog="example: gastro-dist config show --config configs/resnet50.yaml finetune.epochs=40")
    show.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in defaults)")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as `train` takes them")
    show.set_defaults(handler=_cmd_config_show)
    check = config_sub.add_parser("check", help="load a config and report its first mistake, if any",
                                  epilog="example: gastro-dist config check configs/resnet50.yaml")
    check.add_argument("config", type=Path, help="YAML config to check")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides to check with it")
    check.set_defaults(handler=_cmd_config_check)


# ---------------------------------------------------------------- parser and entry point
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (when it has one worth showing), and descriptions and examples
    printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)
class Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows each option's default and its examples as written."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# One example per command, printed at the end of its help.
EXAMPLES = {
    "synth": "gastro-dist synth --out data/synth --per-class 200",
    "pack": "gastro-dist pack /data/gastro --manifest /data/gastro/labels.csv --out /data/shards --test-per-class 150",
    "verify": "gastro-dist verify /data/shards",
    "train": "gastro-dist train --config configs/resnet50.yaml --shards /data/shards --out runs/r50 finetune.epochs=40\n"
             "every config key, its meaning and default: gastro-dist config show --config configs/resnet50.yaml",
    "weights": "gastro-dist weights download resnet50 timm:convnext_tiny.fb_in22k",
    "evaluate": "gastro-dist evaluate --run runs/r50 --shards /data/shards --out runs/r50/eval --cam 3",
    "compare": "gastro-dist compare --configs configs/vgg19.yaml configs/resnet50.yaml --shards /data/shards "
               "--out runs/compare",
    "predict": "gastro-dist predict --run runs/r50 new_images/ --out predictions.csv --tta",
    "predict-video": "gastro-dist predict-video --run runs/r50 procedure.mp4 --out pv/ --annotate --cam-every 25\n"
                     "live, from the video tower's stream: gastro-dist predict-video --run runs/r50 "
                     "udp://0.0.0.0:5000 --out pv-live/",
    "cam": "gastro-dist cam --run runs/r50 frame.jpg --out cams/",
    "export": "gastro-dist export --run runs/r50 --format onnx --out r50.onnx",
    "config": "gastro-dist config show --config configs/resnet50.yaml",
    "cv": "gastro-dist cv --config configs/resnet50.yaml --shards /data/shards-5fold --out runs/cv-r50\n"
          "its shards: gastro-dist pack /data/gastro --out /data/shards-5fold --folds 5 --test-per-class 150",
    "tune": "gastro-dist tune --config configs/resnet50.yaml --shards /data/shards --out runs/tune-r50 --trials 40 "
            "--workers-here 2\nthen: gastro-dist train --config runs/tune-r50/best.yaml --shards /data/shards --out runs/r50-best",
    "bench": "gastro-dist bench loader --shards /data/shards --workers 8",
    "label-issues": "gastro-dist label-issues --cv runs/cv-r50 --out runs/cv-r50/label-review\n"
                    "then, with the decision column filled in: gastro-dist pack /data/gastro --manifest "
                    "/data/gastro/labels.csv --out /data/shards-reviewed --relabel "
                    "runs/cv-r50/label-review/label_issues.csv",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gastro-dist", description="Distributed transfer-learning for gastroscopy image classifiers.")
    parser.add_argument("--version", action="version", version=f"gastro-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    add_training_commands(sub)
    add_evaluation_commands(sub)
    add_cv_commands(sub)
    add_label_commands(sub)
    add_tune_commands(sub)
    add_config_commands(sub)
    add_bench_commands(sub)
    for name, command in sub.choices.items():
        command.epilog = "\n".join(filter(None, [command.epilog, f"example: {EXAMPLES[name]}"]))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: its idle threads then sleep instead of spinning, so that a CPU shared
    # with other processes slows each in proportion (benchmarks/README.md, "CPU threads").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error argparse has printed: its status, returned
        return int(done.code or 0)
    from gastro_dist.data.locations import redact_argv

    sys.argv[:] = redact_argv(sys.argv)  # trackers record the command line: a shard URL's credentials stay out
    try:
        return int(args.handler(args) or 0)
    except Preempted:
        print(f"gastro-dist {args.command}: preempted; checkpoint saved under {args.out}; run the same command again "
              "to resume", file=sys.stderr)
        return PREEMPT_EXIT_CODE
    except UserError as err:
        print(f"gastro-dist {args.command}: error: {err}", file=sys.stderr)
        return err.exit_status
    except BrokenPipeError:  # `gastro-dist config show | head`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a full disk, a folder that cannot be created, a file that cannot be read
        where = f": {err.filename}" if err.filename else ""
        print(f"gastro-dist {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gastro-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    if "torch.distributed" in sys.modules:  # only a command that started one has imported it
        from gastro_dist.training.distributed import end_process_group

        end_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
