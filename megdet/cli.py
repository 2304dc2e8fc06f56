"""The `megdet` command line: data, train, eval, predict, convert, demo, bench.

Heavy imports (torch, torchvision) happen inside the sub-command handlers so that `megdet --help`
answers at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megdet.config import Config, ConfigError, dump_config, load_config
from megdet.files import WriteError, ensure_dir

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
    from megdet.data.layout import ANNOTATIONS_DIR, STUFF_MAPS_DIR
    from megdet.data.synthetic import generate_synthetic_coco

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out}: is a file, not a folder; choose another --out")
    out = Path(args.out)
    existing = [out / n for n in (ANNOTATIONS_DIR, "train", "val", STUFF_MAPS_DIR) if (out / n).exists()]
    if existing and not args.overwrite:
        raise CliError(
            f"{existing[0]} already exists: {out} holds a dataset; pass --overwrite to replace it, or choose another --out"
        )
    stats = generate_synthetic_coco(
        args.out,
        num_train=args.train,
        num_val=args.val,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        stuff=args.stuff,
    )
    from megdet.data.check import check_coco, format_report
    from megdet.data.layout import split_files

    for split in ("train", "val"):
        files = split_files(args.out, split)
        if files.instances.is_file() and stats.get(split, {}).get("images", 1):
            print(f"== {files.instances}")
            print(format_report(check_coco(files.instances, files.images, files.label_maps if args.stuff else None)))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from megdet.data.check import check_coco, format_report

    if args.label_classes is not None and not 1 <= args.label_classes <= 255:
        raise CliError(f"--label-classes: expected 1..255, got {args.label_classes}")
    report = check_coco(
        args.annotations, args.images, args.label_maps, args.label_classes, allow_outside_images=args.allow_outside_images
    )
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


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.print_config:
        from megdet.engine.setup import resolved_schedule_text

        cfg.validate(world)
        print(dump_config(cfg), end="")
        if args.num_images is not None and args.num_images < 1:
            raise CliError(f"--num-images: expected >= 1, got {args.num_images}")
        print(resolved_schedule_text(cfg, world_size=world, num_images=args.num_images))
        return 0
    from megdet.distributed import in_worker

    if args.nproc > 1 and not in_worker():
        from megdet.distributed import launch_local

        cfg.validate(args.nproc)  # one line here rather than the same error from every worker
        return launch_local(args.nproc, _strip_nproc(args.raw_argv))
    from megdet.engine.trainer import NonFiniteLossError, train

    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as e:
        print(f"megdet: error: {e}", file=sys.stderr)
        return 1
    # 128 + the signal (143 SIGTERM, 130 SIGINT): a scheduler sees that the run stopped early, after
    # saving its checkpoint.
    return 128 + int(summary["signal"]) if summary.get("interrupted") else 0


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
# eval, predict
# --------------------------------------------------------------------------------------------------


def _results_iou_type(path: str) -> str:
    """The task of a COCO results file, from its first result's fields (bbox when unreadable or empty)."""
    import json

    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError, RecursionError):
        return "bbox"  # evaluate_coco reports the problem with the file
    first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
    if "keypoints" in first:
        return "keypoints"
    if "segmentation" in first:
        return "segm"
    return "bbox"


def _cmd_eval_results(args: argparse.Namespace) -> int:
    import json

    from megdet.evaluation.coco_eval import EvaluationError, evaluate_coco, format_eval_table

    if not (args.annotations and args.results):
        raise CliError("--annotations GT.json and --results RESULTS.json go together")
    if args.weights or args.tta or args.overrides:
        raise CliError("--annotations/--results evaluate a results file; --weights, --tta and overrides do not apply")
    iou_type = args.iou_type or _results_iou_type(args.results)
    try:
        evals = {iou_type: evaluate_coco(args.annotations, args.results, iou_type)}
    except EvaluationError as e:
        raise CliError(str(e)) from None
    out = ensure_dir(Path(args.out) if args.out else Path(args.results).resolve().parent / "eval", "--out")
    with open(out / "eval.json", "w") as f:
        json.dump(evals, f, indent=2)
    print(format_eval_table(evals))
    print(f"wrote {out / 'eval.json'}")
    return 0


def _check_same_classes(weights: Sequence[str], models: Sequence) -> None:
    # MultiViewPredictor refuses such an ensemble too, but only this level knows the files to name.
    classes = [getattr(m, "num_classes", None) for m in models]
    if len(set(classes)) > 1:
        listed = ", ".join(f"{w} ({c})" for w, c in zip(weights, classes))
        raise CliError(f"an ensemble needs models of the same categories; classes per checkpoint: {listed}")


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.annotations or args.results:
        return _cmd_eval_results(args)
    if not args.weights:
        raise CliError("eval needs --weights CHECKPOINT, or --annotations GT.json --results RESULTS.json")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out}: is a file, not a folder; choose another --out")
    from megdet.distributed import in_worker

    if args.nproc > 1 and not in_worker():
        from megdet.distributed import launch_local

        # What can be checked without loading a model is checked once here, not by every worker.
        for weights in args.weights:
            if not Path(weights).is_file():
                raise CliError(f"{weights}: checkpoint file not found")
        if args.config:
            load_config(args.config, args.overrides)
        return launch_local(args.nproc, _strip_nproc(args.raw_argv))
    import torch.distributed as dist

    from megdet.distributed import cleanup_distributed, init_distributed
    from megdet.evaluation.coco_eval import EvaluationError
    from megdet.evaluation.inference import evaluate_model
    from megdet.evaluation.loading import load_model_from_checkpoint

    # With --config every checkpoint is built from it; without, each from its own stored config. The
    # evaluation settings (data, test) are those of --config or of the first checkpoint.
    given = load_config(args.config, args.overrides) if args.config else None
    overrides = () if given is not None else args.overrides
    models = []
    cfg: Config | None = None
    for weights in args.weights:
        model, model_cfg = load_model_from_checkpoint(weights, given, overrides=overrides)
        models.append(model)
        cfg = cfg or model_cfg
    assert cfg is not None
    _check_same_classes(args.weights, models)
    # Defaults apart per kind of evaluation, so that a TTA or ensemble run never overwrites the plain one.
    default_name = "eval" + ("_ensemble" if len(args.weights) > 1 else "") + ("_tta" if args.tta else "")
    out = Path(args.out) if args.out else Path(args.weights[0]).resolve().parent / default_name
    created = not (dist.is_available() and dist.is_initialized())
    rank, world, _, device = init_distributed(device=cfg.train.device)
    try:
        models = [m.to(device) for m in models]
        try:
            evaluate_model(models, cfg, out_dir=out, tta=args.tta, rank=rank, world_size=world, progress=True)
        except EvaluationError as e:
            raise CliError(str(e)) from None
        if rank == 0:
            print(f"wrote {out / 'eval.json'}")
    finally:
        if created:
            cleanup_distributed()
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from megdet.distributed import resolve_device
    from megdet.evaluation.loading import load_model_and_metadata
    from megdet.evaluation.predict import category_info, keypoint_flip_map, predict_files

    if not 0.0 <= args.score_threshold <= 1.0:
        raise CliError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    ensure_dir(args.out, "--out")
    # As in eval: --config builds every model, else each its own; the first one's settings predict.
    given = load_config(args.config) if args.config else None
    loaded = [load_model_and_metadata(w, given) for w in args.weights]
    models = [model for model, _, _ in loaded]
    _check_same_classes(args.weights, models)
    _, cfg, meta = loaded[0]
    device = resolve_device(cfg.train.device)
    models = [m.to(device) for m in models]
    categories = category_info(cfg, meta)
    flip_map = keypoint_flip_map(cfg, meta) if args.tta and cfg.model.keypoint_on else None
    if args.tta and cfg.model.keypoint_on and cfg.test.tta.flip and flip_map is None:
        raise CliError("--tta flips images, and the keypoint names this needs are unknown; add test.tta.flip=false")
    entries = predict_files(
        models if len(models) > 1 else models[0], cfg, args.images, args.out, categories, args.score_threshold,
        tta=args.tta, keypoint_flip_map=flip_map,
    )  # fmt: skip
    for e in entries:
        print(f"{e['image']}: {len(e['detections'])} detection(s) >= {args.score_threshold:g} -> {e['drawn']}")
    print(f"wrote {Path(args.out) / 'predictions.json'} (category names from {categories.source})")
    return 0


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from megdet.checkpoint import save_checkpoint
    from megdet.modeling.convert.checkpoint import converted_checkpoint

    classes: str | list[int] = args.classes
    if classes not in ("auto", "all"):
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise CliError(f"--classes: expected auto, all or comma-separated class indices, got '{args.classes}'") from None
    given = load_config(args.config, args.overrides) if args.config else None
    overrides = () if given is not None else args.overrides
    ckpt, report, cfg = converted_checkpoint(
        args.source, given, overrides, classes=classes, input_format=args.input_format
    )
    save_checkpoint(args.out, ckpt)
    print("\n".join(report.lines()))
    m = cfg.model
    heads = ["boxes"] + ["masks"] * m.mask_on + [f"{m.num_keypoints} keypoints"] * m.keypoint_on
    print(f"model: {m.backbone} FPN, {m.num_classes} classes, {' + '.join(heads)}")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# demo, bench
# --------------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from megdet.demo import run_demo

    if not Path(args.config).is_file():
        raise CliError(f"{args.config}: demo config not found (run from the repository root, or pass --config)")
    run_demo(out_dir=args.out, config=args.config, nproc=args.nproc, overrides=args.overrides)
    return 0


def _benchmarks_dir() -> Path:
    for candidate in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"):
        if candidate.is_dir():
            return candidate
    raise CliError("no benchmarks/ folder here: run `megdet bench` from the repository root")


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    folder = _benchmarks_dir()
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    if args.name not in names:
        raise CliError(f"unknown benchmark '{args.name}'; available: {', '.join(names)}")
    sys.argv = [str(folder / f"{args.name}.py"), *args.bench_args]
    sys.path.insert(0, str(folder))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def _add_data_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet data synth` and `megdet data check`."""
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
    s.add_argument(
        "--stuff",
        action="store_true",
        help="stuff backgrounds (ground, wall, sky) with COCO-Stuff style label maps in DIR/stuffthingmaps/{train,val}",
    )
    s.add_argument(
        "--overwrite", "--force", action="store_true", help="replace the dataset already in --out (refused without)"
    )
    s.set_defaults(func=_cmd_data_synth)
    c = dsub.add_parser(
        "check",
        help="validate a COCO-format annotation file and print statistics",
        description="Validate any COCO-format file (ours or real COCO) and print statistics and problems. "
        "Exit status 1 when errors are found (warnings, such as the harmless ones real COCO has, do not fail).",
    )
    c.add_argument("annotations", help="COCO annotation JSON (instances_*.json or person_keypoints_*.json)")
    c.add_argument("--images", default=None, help="image folder to check the files of")
    c.add_argument(
        "--label-maps",
        default=None,
        metavar="DIR",
        help="semantic label maps to check (one PNG per image, named as the image; COCO-Stuff's stuffthingmaps)",
    )
    c.add_argument(
        "--label-classes",
        type=int,
        default=None,
        metavar="K",
        help="with --label-maps: ids 0..K-1 are classes (default: COCO-Stuff's category id - 1 of the "
        "categories of ANNOTATIONS and of the stuff_*.json next to it)",
    )
    c.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="accept file names that are absolute or leave the image folder with '..' (an error without)",
    )
    c.set_defaults(func=_cmd_data_check)


def _add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet train`."""
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
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in the run folder (its checkpoints, model_final.pt, metrics; refused without)",
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and schedule, then exit")
    t.add_argument(
        "--num-images",
        type=int,
        default=None,
        metavar="N",
        help="with --print-config: training images per epoch, instead of reading the training split "
        "(to plan a run where the data is not; e.g. 117266 for COCO train2017 with annotated images)",
    )
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=_cmd_train)


def _add_eval_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet eval`."""
    e = sub.add_parser(
        "eval",
        help="COCO evaluation of checkpoints (TTA, ensembles, N processes) or of a results file",
        description="Evaluate a checkpoint on the config's validation split (data.val_split): box, mask and "
        "keypoint AP with pycocotools. Several --weights form an ensemble (boxes fused by voting, masks and "
        "keypoints averaged); --tta adds the views of test.tta. With --annotations and --results, evaluate "
        "a COCO results file instead, without a model.",
        epilog=_EPILOG_OVERRIDES,
    )
    e.add_argument(
        "--config", default=None, help="YAML config for every model (default: each checkpoint's own config)"
    )
    e.add_argument(
        "--weights", action="append", default=[], metavar="CHECKPOINT",
        help="checkpoint (megdet, or torchvision / detectron2 weights, converted on the fly); repeat for an ensemble",
    )
    e.add_argument("--tta", action="store_true", help="test-time augmentation (test.tta: short sides, flip, merge)")
    e.add_argument(
        "--out",
        default=None,
        help="folder for eval.json and the COCO results files (default, next to the first checkpoint: eval/, "
        "eval_tta/ with --tta, eval_ensemble/ or eval_ensemble_tta/ for several --weights; eval/ next to RESULTS)",
    )
    e.add_argument("--nproc", type=int, default=1, help="local worker processes sharing the images (default 1)")
    e.add_argument("--annotations", default=None, metavar="GT.json", help="ground truth of a results file")
    e.add_argument("--results", default=None, metavar="RESULTS.json", help="COCO results file to evaluate")
    e.add_argument(
        "--iou-type",
        choices=("bbox", "segm", "keypoints"),
        default=None,
        help="task of --results (default: from its fields)",
    )
    e.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    e.set_defaults(func=_cmd_eval)


def _add_predict_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet predict`."""
    pr = sub.add_parser(
        "predict",
        help="draw a checkpoint's detections on image files and write them as JSON",
        description="Run a checkpoint on image files (resized with the test transform; predictions in "
        "original-image pixels). Writes OUT/NAME.png with boxes, labels, scores, masks and keypoint "
        "skeletons drawn, OUT/NAME.json per image and OUT/predictions.json for all.",
    )
    pr.add_argument(
        "--weights", action="append", required=True, metavar="CHECKPOINT",
        help="checkpoint to run (megdet, or torchvision / detectron2 weights); repeat for an ensemble",
    )  # fmt: skip
    pr.add_argument("--config", default=None, help="YAML config (default: the checkpoint's own config)")
    pr.add_argument("--tta", action="store_true", help="test-time augmentation (test.tta: short sides, flip, merge)")
    pr.add_argument(
        "--score-threshold", type=float, default=0.5, help="draw and write detections scoring at least this"
    )
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    pr.set_defaults(func=_cmd_predict)


def _add_convert_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet convert`."""
    cv = sub.add_parser(
        "convert",
        help="convert torchvision or detectron2 detector weights into a megdet checkpoint",
        description="Convert a torchvision Faster / Mask / Keypoint R-CNN R50-FPN (v1) state_dict, or a "
        "detectron2 R50-FPN checkpoint (.pkl or .pth), into a megdet checkpoint (model, config, categories) "
        "by explicit name mapping, and print what was converted. Without --config the config is the source "
        "model's (its pre-processing, anchors, RoIAlign, thresholds) with the architecture read from the "
        "tensors; with --config, class heads of another size are re-initialised for fine-tuning. A file "
        "that does not fit is a one-line error. Weights are read from local files only.",
        epilog=_EPILOG_OVERRIDES,
    )
    cv.add_argument("source", metavar="SOURCE", help="torchvision .pth / detectron2 .pkl or .pth file")
    cv.add_argument("out", metavar="OUT", help="megdet checkpoint to write (e.g. weights/maskrcnn_r50_fpn.pt)")
    cv.add_argument("--config", default=None, help="YAML config of the target model (default: the source's)")
    cv.add_argument(
        "--classes",
        default="auto",
        help="classes to keep: auto (the 80 COCO categories of a torchvision COCO head, else all), all, or "
        "comma-separated 1-based class indices of the source in the order wanted",
    )
    cv.add_argument(
        "--input-format",
        choices=("RGB", "BGR"),
        default=None,
        help="channel order the source model reads (default: BGR for detectron2, RGB for torchvision)",
    )
    cv.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    cv.set_defaults(func=_cmd_convert)


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet demo`."""
    d = sub.add_parser(
        "demo",
        help="generate the synthetic dataset, train, evaluate (with and without TTA) and write a report",
        description="The main job on the embedded default dataset: synthetic data -> training with N "
        "processes (cross-device BN, linear-scaled lr with warmup) -> COCO evaluation with and without "
        "test-time augmentation -> OUT/report.md with AP tables, plots and example predictions.",
        epilog=_EPILOG_OVERRIDES,
    )
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--config", default="configs/demo.yaml", help="config (default configs/demo.yaml)")
    d.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(func=_cmd_demo)


def _add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`megdet bench`."""
    b = sub.add_parser(
        "bench",
        help="run a benchmark script from benchmarks/ (prints a table, writes JSON)",
        description="Run benchmarks/NAME.py with the remaining arguments (e.g. `megdet bench prroi_pool --quick`).",
    )
    b.add_argument("name", help="benchmark name, e.g. train_step, prroi_pool, data_loader")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    p = argparse.ArgumentParser(
        prog="megdet",
        description="Train and evaluate FPN R-CNN detectors (boxes, masks, keypoints) with large mini-batches.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_data_parsers, _add_train_parser, _add_eval_parser, _add_predict_parser, _add_convert_parser,
                _add_demo_parser, _add_bench_parser):  # fmt: skip
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `megdet` console script."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(raw)
    # argparse takes only the first run of key=value overrides; later ones (after an option, as in
    # `a=1 --nproc 2 b=2`) come back as extras, in order, and belong to the same list.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.raw_argv = raw
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CliError, WriteError) as e:
        print(f"megdet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop (which saves a checkpoint and returns 130 itself).
        print("megdet: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # e.g. a log line on a full disk
            print(f"megdet: error: {e.filename or 'a write'}: {e.strerror}; free some space", file=sys.stderr)
            return 2
        raise
    except ValueError as e:
        # Dataset and checkpoint errors are ValueErrors with a one-line message naming the file.
        if type(e).__name__ in ("DatasetError", "CheckpointError", "ConfigError", "WeightsError"):
            print(f"megdet: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
