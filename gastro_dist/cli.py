"""Command line: parses arguments and calls library functions, nothing more.

Every handler below imports its module lazily so that `gastro-dist --help` and the data
commands start fast and do not import torch when they need not.
A `UserError` (or a `FileNotFoundError` / `ValueError` raised while reading user input)
is printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gastro_dist import UserError, __version__


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

    settings = PackSettings(
        val_fraction=args.val_fraction,
        test_per_class=args.test_per_class,
        test_fraction=args.test_fraction,
        resize_short=args.resize_short,
        input_size=args.input_size,
        quality=args.quality,
        shard_size=args.shard_size,
        workers=args.workers,
        seed=args.seed,
    )
    result = pack_dataset(
        src=args.src,
        out_dir=args.out,
        settings=settings,
        manifest=args.manifest,
        class_map=args.class_map,
    )
    return 0 if result.packed > 0 else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from gastro_dist.data.verify import verify_shards

    problems = verify_shards(args.dir)
    return 1 if problems else 0


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic endoscopy-like dataset (class folders + manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size-range", type=int, nargs=2, default=(640, 1280), metavar=("MIN_W", "MAX_W"),
                   help="frame width range in pixels (height follows a 5:4 or 4:3 aspect)")
    p.add_argument("--images-per-patient", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"))
    p.add_argument("--style", default="default",
                   help="rendering style: 'default' or 'alt' (different palette/optics, for generalisation checks)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("pack", help="validate images and pack them into WebDataset shards with patient-grouped splits")
    p.add_argument("src", type=Path, help="image tree: one folder per class, or any tree with --manifest")
    p.add_argument("--out", type=Path, required=True, help="shard folder to write")
    p.add_argument("--manifest", type=Path, default=None, help="CSV with path,label[,patient_id] (paths relative to SRC)")
    p.add_argument("--class-map", type=Path, default=None,
                   help="YAML/JSON mapping folder names (or relative folder paths) to class names; unmapped folders are skipped")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-per-class", type=int, default=None, help="exactly N test images per class (the study used 150)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="test share when --test-per-class is not given")
    p.add_argument("--resize-short", type=int, default=None,
                   help="store the shorter side at PX (default: what --input-size needs; 0 keeps originals)")
    p.add_argument("--input-size", type=int, default=224, help="model input size the shards are meant for (224, 299)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_pack)

    p = sub.add_parser("verify", help="re-read every shard and check it against index.json")
    p.add_argument("dir", type=Path)
    p.set_defaults(handler=_cmd_verify)


# ---------------------------------------------------------------- training
def _cmd_train(args: argparse.Namespace) -> int:
    from gastro_dist.config import load_config
    from gastro_dist.training.trainer import PREEMPT_EXIT_CODE, Preempted, train

    config = load_config(args.config, args.overrides)
    try:
        train(config, shards_dir=args.shards, run_dir=args.out)
    except Preempted:
        print(f"gastro-dist train: preempted; checkpoint saved in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return PREEMPT_EXIT_CODE
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
    p.add_argument("--shards", type=Path, required=True, help="folder written by `gastro-dist pack`")
    p.add_argument("--out", type=Path, required=True, help="run folder (created; resumed when it holds checkpoints)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. head.epochs=2 data.batch_size=64")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("weights", help="manage pretrained weights")
    weights_sub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    d = weights_sub.add_parser("download", help="fetch torchvision ImageNet weights into the torch hub cache (needs internet)")
    d.add_argument("models", nargs="+", metavar="MODEL")
    d.set_defaults(handler=_cmd_weights_download)


# ---------------------------------------------------------------- parser and entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gastro-dist",
        description="Distributed transfer-learning for gastroscopy image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"gastro-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"gastro-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gastro-dist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
