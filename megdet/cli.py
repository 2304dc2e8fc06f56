"""The `megdet` command line: data, train, eval, predict, demo, bench.

Heavy imports (torch, torchvision) happen inside the sub-command handlers so that `megdet --help`
answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megdet.config import Config, ConfigError, dump_config, load_config

_EPILOG_OVERRIDES = (
    "Config values are overridden with trailing key.sub=value arguments, e.g. "
    "model.backbone=resnet50 solver.base_lr=0.01 data.min_size_train=[224,256]."
)


class CliError(RuntimeError):
    """An error to print as one line and exit with status 2."""


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from megdet.data.synthetic import generate_synthetic_coco

    stats = generate_synthetic_coco(
        args.out,
        num_train=args.train,
        num_val=args.val,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    from megdet.data.check import check_coco, format_report

    out = Path(args.out)
    for split in ("train", "val"):
        ann = out / "annotations" / f"instances_{split}.json"
        if ann.is_file() and stats.get(split, {}).get("images", 1):
            print(f"== {ann}")
            print(format_report(check_coco(ann, out / split)))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from megdet.data.check import check_coco, format_report

    report = check_coco(args.annotations, args.images)
    print(format_report(report))
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"train.out_dir={args.out}")
    return load_config(args.config, overrides)


def _in_worker() -> bool:
    """True inside a process started by torchrun or by our own local launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.print_config:
        from megdet.engine.trainer import resolved_schedule_text

        print(dump_config(cfg), end="")
        print(resolved_schedule_text(cfg, world_size=world))
        return 0
    if args.nproc > 1 and not _in_worker():
        from megdet.engine.distributed import launch_local

        return launch_local(args.nproc, _strip_nproc(args.raw_argv))
    from megdet.engine.trainer import train

    train(cfg, resume=args.resume)
    return 0


def _strip_nproc(argv: Sequence[str]) -> list[str]:
    """The argument list without --nproc (each worker is one process)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    p = argparse.ArgumentParser(
        prog="megdet",
        description="Train and evaluate FPN R-CNN detectors (boxes, masks, keypoints) with large mini-batches.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # data -------------------------------------------------------------------------------------
    data = sub.add_parser("data", help="generate the synthetic dataset or check a COCO-format dataset")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    s = dsub.add_parser(
        "synth",
        help="write the synthetic COCO-format dataset (boxes, masks, keypoints)",
        description="Write a synthetic dataset in the COCO 2017 layout: DIR/{train,val}/*.png and "
        "DIR/annotations/{instances,person_keypoints}_{train,val}.json.",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    s.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    s.add_argument("--image-size", type=int, default=256, help="long side of each image in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files")
    s.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_data_synth)
    c = dsub.add_parser(
        "check",
        help="validate a COCO-format annotation file and print statistics",
        description="Validate any COCO-format file (ours or real COCO) and print statistics and problems. "
        "Exit status 1 when problems are found.",
    )
    c.add_argument("annotations", help="COCO annotation JSON (instances_*.json or person_keypoints_*.json)")
    c.add_argument("--images", default=None, help="image folder to check the files of")
    c.set_defaults(func=_cmd_data_check)

    # train ------------------------------------------------------------------------------------
    t = sub.add_parser(
        "train",
        help="train a detector (one process, N local processes, or under torchrun)",
        description="Train a detector. With --nproc N, N local worker processes are launched with "
        "torch.distributed's elastic launcher; under torchrun the same command runs in every worker.",
        epilog=_EPILOG_OVERRIDES,
    )
    t.add_argument("--config", default=None, help="YAML config (see configs/)")
    t.add_argument("--nproc", type=int, default=1, help="local worker processes (default 1)")
    t.add_argument("--out", default=None, help="run folder (overrides train.out_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and schedule, then exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `megdet` console script."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.raw_argv = raw
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CliError) as e:
        print(f"megdet: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Dataset and checkpoint errors are ValueErrors with a one-line message naming the file.
        if type(e).__name__ in ("DatasetError", "CheckpointError", "ConfigError"):
            print(f"megdet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
