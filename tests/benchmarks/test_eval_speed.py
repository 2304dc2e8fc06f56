"""The evaluation-speed benchmark (benchmarks/eval_speed.py) end to end on a tiny setting: 2 synthetic
images of 64 px, a narrow ResNet-10 model, 5 detections per image."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import eval_speed  # noqa: E402

TINY = [
    "model.backbone=resnet10",
    "model.fpn_channels=16",
    "model.roi.box_head_dim=32",
    "model.roi.mask_head_dim=16",
    "model.roi.keypoint_head_dim=16",
    "model.roi.keypoint_head_convs=2",
    "data.min_size_test=64",
    "data.max_size_test=64",
    "test.tta.min_sizes=[64]",
]
NUM_VAL, DETECTIONS = 2, 5


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval_speed")
    threads = torch.get_num_threads()
    try:
        payload = eval_speed.main(
            ["--threads", "1", "--num-val", str(NUM_VAL), "--image-size", "64", "--detections", str(DETECTIONS),
             "--passes", "1", "--tta-images", "2", "--results-dir", str(out), "--set", *TINY]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    written = json.loads((out / "eval_speed.json").read_text())
    assert written["forward"] == json.loads(json.dumps(payload["forward"]))
    return written


def test_json_has_machine_and_settings(result: dict) -> None:
    assert result["benchmark"] == "eval_speed"
    assert result["machine"]["torch_threads"] == 1
    s = result["settings"]
    assert (s["num_val"], s["detections_per_img"], s["score_thresh"], s["norm"]) == (
        NUM_VAL,
        DETECTIONS,
        0.0,
        "FrozenBN",
    )
    assert result["weights_copied"] > 0
    assert result["params"]["ours"] == result["params"]["torchvision"]


def test_forward_counts_every_image_and_the_ratio_follows_from_the_timings(result: dict) -> None:
    f = result["forward"]
    assert f["images"] == NUM_VAL
    for name in ("ours", "torchvision"):
        r = f[name]
        (seconds,) = r["forward_s_per_pass"]
        assert seconds > 0
        assert r["images_per_s"] == pytest.approx(NUM_VAL / seconds)
        assert r["ms_per_image"] == pytest.approx(1000 * seconds / NUM_VAL)
        # The stages partition the forward.
        assert sum(r["stages_ms_per_image"].values()) == pytest.approx(r["ms_per_image"])
        # Score threshold 0: exactly the requested number of detections on every image.
        assert r["detections_per_image_min"] == r["detections_per_image_max"] == DETECTIONS
        assert sum(r["detections_by_label"].values()) == NUM_VAL * DETECTIONS
    assert f["ours"]["stages_ms_per_image"]["resize+normalise"] == 0.0  # done by our data loader
    assert f["torchvision"]["stages_ms_per_image"]["resize+normalise"] > 0
    ratio = f["ours"]["images_per_s"] / f["torchvision"]["images_per_s"]
    assert f["ratio_images_per_s_ours_over_torchvision"] == pytest.approx(ratio)
    assert ratio == pytest.approx(statistics.median(f["torchvision"]["forward_s_per_pass"]) /
                                  statistics.median(f["ours"]["forward_s_per_pass"]))  # fmt: skip


def test_evaluation_timings_and_result_counts(result: dict) -> None:
    e = result["evaluation"]["single"]
    assert e["images"] == NUM_VAL and e["ranks"] == 1 and e["tta"] is False
    for key in ("inference_s", "model_s", "coco_eval_s", "data_loading_s", "encode_s", "images_per_s"):
        assert e[key] > 0, key
    assert e["model_s"] <= e["inference_s"]
    assert e["images_per_s"] == pytest.approx(NUM_VAL / e["inference_s"])
    assert e["end_to_end_images_per_s"] == pytest.approx(NUM_VAL / (e["inference_s"] + e["coco_eval_s"]))
    tasks = e["coco_eval_per_task"]["tasks"]
    assert set(tasks) == {"bbox", "segm", "keypoints"}
    assert all(t["seconds"] > 0 for t in tasks.values())
    assert tasks["bbox"]["results"] == tasks["segm"]["results"] == NUM_VAL * DETECTIONS
    # Keypoint results: one per person detection (label 7 = COCO id 7, the synthetic person).
    assert tasks["keypoints"]["results"] == result["forward"]["ours"]["detections_by_label"].get("7", 0)


def test_tta_cost_ratio_is_measured_on_the_same_images(result: dict) -> None:
    t = result["evaluation"]["tta"]
    ref, tta = t["single_scale"], t["tta"]
    assert ref["images"] == tta["images"] == 2
    assert ref["tta"] is False and tta["tta"] is True
    assert t["views"] == 2  # one short side, flipped and not
    assert t["cost_ratio_inference_s"] == pytest.approx(tta["inference_s"] / ref["inference_s"])
    assert t["cost_ratio_model_s"] == pytest.approx(tta["model_s"] / ref["model_s"])


def test_torchvision_twin_computes_the_same_network(tmp_path: Path) -> None:
    from megdet.data.synthetic import generate_synthetic_coco
    from megdet.modeling.detector import build_model

    generate_synthetic_coco(tmp_path, num_train=0, num_val=1, image_size=64, workers=1, progress=False)
    cfg = eval_speed.benchmark_config(eval_speed.DEFAULT_CONFIG, tmp_path, DETECTIONS, TINY)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    tv = eval_speed.build_torchvision_twin(cfg)
    batch = eval_speed.load_batches(cfg)[0][0]
    assert eval_speed.share_weights(tv, ours, batch) == len(ours.state_dict())
    classifier = ours.roi_heads.box_head.predictor.cls_score.weight
    assert torch.equal(tv.roi_heads.box_predictor.cls_score.weight, classifier)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = ours.backbone(x)
        b = list(tv.backbone(x).values())
        assert len(a) == len(b) == 5  # P2..P6
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4)
        la, da = ours.rpn.rpn.head(a)
        lb, db = tv.rpn.head(b)
        for u, v in zip([*la, *da], [*lb, *db]):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
