"""Training-step time of our R50-FPN Faster R-CNN against torchvision's, at equal settings, on CPU.

One step = forward + backward + SGD step on 2 images of 512x512. Both models: ResNet-50 FPN with
FrozenBN, stem and layer1 frozen (trainable layers 3), the same RPN / RoI sampling sizes and
proposal counts, 80 foreground classes, fp32. torchvision's ``fasterrcnn_resnet50_fpn(weights=None,
weights_backbone=None)`` switches its body to trainable BatchNorm when no weights are given, so its
BN layers are converted to FrozenBN and its first stages frozen here to match. Ours runs as built by
``build_model`` (its FrozenBN folded into the convs), with torchvision's initial weights copied in.
The runs alternate (ours, torchvision, ours-bf16, ...) so that load on a shared machine hits all
alike; medians are reported. Also:
achieved FLOP/s (FlopCounterMode over one step) against the machine's fp32 matrix-multiply peak
measured in the same run, and our step under bf16 autocast (on CPUs without native bf16, oneDNN
emulates it and it is several times slower, so by default it is timed once there).

    python benchmarks/train_step.py [--quick] [--iters N] [--bf16-steps N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import copy_weights
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from megdet.config import load_config
from megdet.layers.norm import convert_frozen_batchnorm
from megdet.modeling.detector import GeneralizedRCNN, build_model

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

SETTINGS = {
    "images": 2,
    "size": 512,
    "num_classes": 80,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "box_batch_size_per_image": 512,
    "box_positive_fraction": 0.25,
    "trainable_layers": 3,
    "norm": "FrozenBN",
}


def build_ours() -> GeneralizedRCNN:
    s = SETTINGS
    cfg = load_config(None, [
        "model.backbone=resnet50", f"model.norm={s['norm']}", f"model.trainable_layers={s['trainable_layers']}",
        "model.fpn_channels=256", f"model.num_classes={s['num_classes']}",
        "model.rpn.anchor_sizes=[32,64,128,256,512]",
        f"model.rpn.pre_nms_top_n_train={s['rpn_pre_nms_top_n_train']}",
        f"model.rpn.post_nms_top_n_train={s['rpn_post_nms_top_n_train']}",
        f"model.rpn.batch_size_per_image={s['rpn_batch_size_per_image']}",
        f"model.rpn.positive_fraction={s['rpn_positive_fraction']}",
        f"model.roi.batch_size_per_image={s['box_batch_size_per_image']}",
        f"model.roi.positive_fraction={s['box_positive_fraction']}",
        "model.roi.box_head=2fc", "model.roi.box_head_dim=1024", "model.roi.pooler=roialign",
    ])  # fmt: skip
    return build_model(cfg)


def build_torchvision() -> torch.nn.Module:
    s = SETTINGS
    model = fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=s["num_classes"] + 1,
        min_size=s["size"],
        max_size=s["size"],
        rpn_pre_nms_top_n_train=s["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=s["rpn_post_nms_top_n_train"],
        rpn_batch_size_per_image=s["rpn_batch_size_per_image"],
        rpn_positive_fraction=s["rpn_positive_fraction"],
        box_batch_size_per_image=s["box_batch_size_per_image"],
        box_positive_fraction=s["box_positive_fraction"],
    )
    body = model.backbone.body
    convert_frozen_batchnorm(body)  # torchvision's default for a pretrained backbone
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: s["trainable_layers"]]
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)
    return model


def make_data(seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    n, size = SETTINGS["images"], SETTINGS["size"]
    images = torch.rand(n, 3, size, size, generator=g)
    targets = []
    for _ in range(n):
        xy = torch.rand(6, 2, generator=g) * (size - 160)
        wh = 24 + torch.rand(6, 2, generator=g) * 136
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, SETTINGS["num_classes"] + 1, (6,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                           weight_decay=1e-4)  # fmt: skip


def step_fn(name: str, model: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]):
    """A closure running one training step of ``model`` on the batch."""
    opt = sgd(model)
    model.train()
    size = SETTINGS["size"]
    if name == "torchvision":
        tv_images = list(images)  # torchvision normalises and batches inside the model

        def run() -> None:
            losses = model(tv_images, targets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()

        return run
    normalised = (images - MEAN) / STD  # our data pipeline hands the model normalised, padded images
    sizes = [(size, size)] * len(images)
    autocast = name == "ours_bf16"

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses = model(normalised, sizes, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return run


def count_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def matmul_peak(seconds: float) -> float:
    """fp32 GEMM throughput (FLOP/s) of this process's threads: the best of repeated 2048^3 products."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 timed steps per model instead of --iters")
    ap.add_argument("--iters", type=int, default=5, help="timed fp32 steps per model")
    ap.add_argument("--bf16-steps", type=int, default=-1,
                    help="timed bf16-autocast steps (-1: as --iters where the CPU has native bf16, else 1; "
                         "0: skip)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    iters = 2 if args.quick else args.iters
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    bf16_steps = args.bf16_steps if args.bf16_steps >= 0 else (iters if native_bf16 else 1)

    torch.manual_seed(0)
    images, targets = make_data()
    models = {"ours": build_ours(), "torchvision": build_torchvision()}
    copy_weights(models["torchvision"], models["ours"])
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    runs = {name: step_fn(name, m, images, targets) for name, m in models.items()}
    if bf16_steps:
        runs["ours_bf16"] = step_fn("ours_bf16", models["ours"], images, targets)

    def log(msg: str) -> None:
        print(msg, flush=True)

    # The counted step is also each fp32 model's warm-up step (oneDNN primitive creation, allocator).
    # The models' weights diverge a little with every step; both take the same number of steps.
    flops = {}
    for name in ("ours", "torchvision"):
        t = time.perf_counter()
        flops[name] = count_flops(runs[name])
        log(f"warm-up + FLOP count {name}: {flops[name] / 1e9:.1f} GFLOP ({time.perf_counter() - t:.1f} s)")
    peaks = [matmul_peak(2.0 if args.quick else 4.0)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(max(iters, bf16_steps)):
        for name, run in runs.items():
            if i >= (bf16_steps if name == "ours_bf16" else iters):
                continue
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
            log(f"step {i + 1} {name}: {times[name][-1]:.2f} s")
    peaks.append(matmul_peak(2.0 if args.quick else 4.0))
    peak = max(peaks)

    med = {n: statistics.median(v) for n, v in times.items()}
    tv = med["torchvision"]
    rows = []
    for name in runs:
        f = flops["ours" if name == "ours_bf16" else name]
        rows.append({
            "model": name, "median_s": med[name], "min_s": min(times[name]), "steps": len(times[name]),
            "ratio_vs_torchvision_fp32": med[name] / tv, "gflop_per_step": f / 1e9,
            "achieved_gflops": f / med[name] / 1e9, "fraction_of_fp32_mm_peak": f / med[name] / peak,
        })  # fmt: skip
    print(f"\n{'model':<12} {'median s':>9} {'min s':>8} {'steps':>5} {'vs tv fp32':>10} {'GFLOP/step':>11} "
          f"{'GFLOP/s':>8} {'of peak':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<12} {r['median_s']:9.2f} {r['min_s']:8.2f} {r['steps']:5d} "
              f"{r['ratio_vs_torchvision_fp32']:10.3f} {r['gflop_per_step']:11.1f} {r['achieved_gflops']:8.1f} "
              f"{r['fraction_of_fp32_mm_peak']:8.1%}")  # fmt: skip
    print(f"fp32 matmul peak ({args.threads} threads): {peak / 1e9:.1f} GFLOP/s (before / after: "
          f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}); params ours {params['ours'] / 1e6:.2f}M, "
          f"torchvision {params['torchvision'] / 1e6:.2f}M; native CPU bf16: {native_bf16}")  # fmt: skip
    result: dict[str, Any] = {
        "settings": {
            **SETTINGS,
            "threads": args.threads,
            "timed_steps": iters,
            "bf16_steps": bf16_steps,
            "quick": args.quick,
            "ours_channels_last": models["ours"].channels_last,
        },  # fmt: skip
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },  # fmt: skip
        "fp32_matmul_peak_gflops": peak / 1e9,
        "params": params,
        "trainable_params": trainable,
        "rows": rows,
        "times_s": times,
        "ratio_fp32": med["ours"] / tv,
        "ratio_bf16_vs_torchvision_fp32": med["ours_bf16"] / tv if "ours_bf16" in med else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    bf16 = result["ratio_bf16_vs_torchvision_fp32"]
    bf16_text = (
        "skipped" if bf16 is None else f"{bf16:.3f}" + ("" if native_bf16 else " (emulated bf16 on this CPU)")
    )
    print(f"ratio fp32 {result['ratio_fp32']:.3f} (goal <= 1.0); bf16 autocast {bf16_text} (goal <= 0.6); "
          f"wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
