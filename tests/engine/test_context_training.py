"""Training with MegDet's "+Context/Seg" (the semantic branch and the RoI heads' context): sublinear
memory, cross-device BN layers, bit-exact resume, then `megdet eval --tta` and `megdet predict`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megdet.checkpoint import load_checkpoint
from megdet.cli import main
from megdet.config import load_config
from megdet.data.loader import build_train_loader
from megdet.data.synthetic import generate_synthetic_coco
from megdet.engine.trainer import accumulate_gradients, train
from megdet.layers.cross_device_bn import CrossDeviceBatchNorm2d
from megdet.layers.recompute import apply_recompute, recompute_names
from megdet.modeling.detector import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONTEXT = ["model.context.semantic=true", "model.context.roi_features=true", "model.context.global_context=true",
           "model.context.semantic_convs=2", "model.context.semantic_dim=16", "model.mask_on=true"]  # fmt: skip
DEMO_CONTEXT = Path(__file__).resolve().parents[2] / "configs" / "demo_context.yaml"


def test_semantic_tower_is_recomputed_with_equal_gradients(tiny_cfg) -> None:
    # The tiny synthetic set has no label maps: the labels come from the instance masks (8 classes).
    cfg = tiny_cfg(*CONTEXT, "model.norm=CrossDeviceBN", "model.bn_group_size=1")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    norms = [m for m in model.semantic_branch.modules() if isinstance(m, CrossDeviceBatchNorm2d)]
    assert len(norms) == 2 + 4 + 1 and all(m.group_size == 1 for m in norms)  # convs, laterals, embedding
    assert model.semantic_branch.num_classes == 8
    assert "semantic_branch.convs" in recompute_names(model, model.recompute_stages(), "stages")
    assert {"semantic_branch.convs.0", "semantic_branch.convs.1"} <= set(recompute_names(model, model.recompute_stages(), "blocks"))

    batch = next(iter(build_train_loader(cfg, 0, 1)))
    assert all(t["sem_seg"].shape == tuple(s) for t, s in zip(batch.targets, batch.image_sizes))
    wrapped = apply_recompute(copy.deepcopy(model), recompute_names(model, model.recompute_stages(), "stages"))
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    la = accumulate_gradients(model, [batch], device=cpu)
    torch.manual_seed(1)
    lb = accumulate_gradients(wrapped, [batch], device=cpu)
    assert la == pytest.approx(lb, rel=1e-6) and la["loss_sem_seg"] > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    other = {n.replace(".inner.", "."): p.grad for n, p in wrapped.named_parameters() if p.grad is not None}
    assert grads.keys() == other.keys() and any(n.startswith("semantic_branch.convs") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], other[n], rtol=1e-5, atol=1e-7, msg=n)
    # The recomputed branch's BN statistics were updated once.
    for k, v in model.state_dict().items():
        assert torch.equal(v, wrapped.state_dict()[k]), k


@pytest.fixture(scope="module")
def stuff_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_stuff")
    generate_synthetic_coco(root, num_train=6, num_val=3, image_size=96, seed=0, workers=1, progress=False, stuff=True)
    return root


def _tiny_demo_context(root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that shrink configs/demo_context.yaml to a few seconds on the tiny stuff dataset."""
    return [
        f"data.root={root}", f"train.out_dir={out}", "data.min_size_train=[64]", "data.max_size_train=96",
        "data.min_size_test=64", "data.max_size_test=96", "data.images_per_device=2", "model.fpn_channels=32",
        "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=30", "model.roi.mask_head_convs=1",
        "model.roi.keypoint_head_convs=1", "test.tta.min_sizes=[64,80]", "test.images_per_device=2",
        "train.max_iters=4", "train.checkpoint_period=2", "train.log_period=1", *extra,
    ]  # fmt: skip


def test_context_run_resumes_exactly_then_eval_tta_and_predict(
    stuff_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, die_in
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = train(load_config(DEMO_CONTEXT, _tiny_demo_context(stuff_root, full_dir, "test.eval_period=-1")))
    assert full["iteration"] == 4 and full["losses"]["loss_sem_seg"] > 0

    # A second run dies in iteration 3, after the checkpoint at 2, and resumes.
    cfg = load_config(DEMO_CONTEXT, _tiny_demo_context(stuff_root, resumed_dir, "test.eval_period=-1"))
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, hooks=[die_in(3)])
    assert train(cfg, resume=True)["iteration"] == 4
    a = load_checkpoint(full_dir / "model_0000004.pt")
    b = load_checkpoint(resumed_dir / "model_0000004.pt")
    assert any(k.startswith("semantic_branch.") for k in a["model"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k

    # megdet eval --tta: COCO AP and the mIoU, written next to each other.
    assert main(["eval", "--weights", str(full_dir / "model_final.pt"), "--tta"]) == 0
    printed = capsys.readouterr().out
    evals = json.loads((full_dir / "eval_tta" / "eval.json").read_text())
    assert {"bbox", "segm", "keypoints", "sem_seg"} <= set(evals)
    assert 0 <= evals["sem_seg"]["stats"]["mIoU"] <= 1 and "sem_seg mIoU" in printed
    assert set(evals["sem_seg"]["per_class_iou"]) == {
        "circle", "triangle", "rectangle", "star", "ring", "cross", "person", "ground", "wall", "sky"
    }  # fmt: skip

    # megdet predict writes the label map as a PNG next to the drawing.
    image = stuff_root / "val" / "000100000001.png"
    assert main(["predict", "--weights", str(full_dir / "model_final.pt"), "--out", str(tmp_path / "pred"),
                 str(image)]) == 0  # fmt: skip
    entry = json.loads((tmp_path / "pred" / "000100000001.json").read_text())
    labels = Image.open(entry["sem_seg"])
    assert labels.mode == "P" and labels.size == Image.open(image).size
    assert np.array(labels).max() < 10


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_context_trains_and_evaluates_on_cuda(tiny_cfg, amp: str) -> None:
    # bf16 on CUDA also turns channels_last on (train.channels_last=auto); PrRoIPool runs its Triton kernels.
    common = [*CONTEXT, "model.roi.pooler=prroi", "train.device=cuda", f"train.amp={amp}", "test.max_images=2"]
    summary = train(tiny_cfg(*common, "train.max_iters=2", "test.eval_period=2"))
    assert summary["iteration"] == 2 and summary["losses"]["loss_sem_seg"] > 0
    assert 0 <= summary["eval"]["sem_seg"]["stats"]["mIoU"] <= 1
