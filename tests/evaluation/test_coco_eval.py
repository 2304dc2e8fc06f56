"""COCO evaluation: peer cases, round trips through our results conversion, errors, distributed gather.

The peer cases tests/data/coco_keypoints_fce_case.json and tests/data/coco_segm_fce_case.json are
copies of /work/shared/testdata/ files of those names (ground truth, detections and expected stats
taken from faster-coco-eval's tests, MiXaiLL76/faster_coco_eval; each file records its source).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util

from megdet.evaluation.coco_eval import (
    COCOEvaluator,
    EvaluationError,
    evaluate_all,
    evaluate_coco,
    format_eval_table,
    gather_predictions,
    predictions_to_coco_results,
)

DATA = Path(__file__).resolve().parents[1] / "data"
KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
CATEGORY_IDS = [2, 5, 9]  # deliberately not 1..K: label i <-> CATEGORY_IDS[i - 1]
CATEGORY_NAMES = ["square", "disk", "person"]
PERSON = 9
# pycocotools' own decode trips a numpy 2 deprecation inside its Cython code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
W, H = 160, 128


# --------------------------------------------------------------------------------------------------
# A small hand-made ground truth with objects in every area range (small < 32^2 < medium < 96^2 < large)
# --------------------------------------------------------------------------------------------------


def _rect(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _disk(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8)


def _person_keypoints(x1: int, y1: int, x2: int, y2: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    xs = rng.uniform(x1 + 2, x2 - 2, 17).round()
    ys = rng.uniform(y1 + 2, y2 - 2, 17).round()
    vis = rng.choice([0, 1, 2, 2, 2], 17)
    vis[5] = 2  # at least one labelled keypoint
    kps = []
    for x, y, v in zip(xs, ys, vis):
        kps += [float(x), float(y), int(v)] if v > 0 else [0.0, 0.0, 0]
    return kps


def _objects() -> dict[int, list[tuple[int, np.ndarray, list[float] | None]]]:
    """image id -> [(category id, mask, keypoints or None)]."""
    return {
        1: [(2, _rect(10, 10, 28, 28), None), (5, _disk(80, 40, 25), None),
            (PERSON, _rect(30, 20, 150, 120), _person_keypoints(30, 20, 150, 120, 0))],
        2: [(PERSON, _rect(20, 30, 80, 110), _person_keypoints(20, 30, 80, 110, 1)),
            (2, _rect(40, 10, 150, 115), None)],
        3: [(5, _disk(120, 90, 10), None), (2, _rect(20, 20, 70, 70), None)],
    }  # fmt: skip


def write_gt(root: Path) -> tuple[Path, Path]:
    """Writes instances.json (all categories, masks as RLE) and person_keypoints.json (person only)."""
    images = [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in _objects()]
    anns, kp_anns = [], []
    for image_id, objs in _objects().items():
        for cat, m, kps in objs:
            rle = mask_util.encode(np.asfortranarray(m))
            ann = {
                "id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }  # fmt: skip
            anns.append(ann)
            if kps is not None:
                kp_anns.append(dict(ann, keypoints=kps, num_keypoints=sum(v > 0 for v in kps[2::3])))
    cats = [{"id": c, "name": n, "supercategory": "thing"} for c, n in zip(CATEGORY_IDS, CATEGORY_NAMES)]
    person = dict(cats[2], keypoints=KEYPOINT_NAMES, skeleton=[[16, 14], [14, 12], [6, 7]])
    root.mkdir(parents=True, exist_ok=True)
    instances, keypoints = root / "instances.json", root / "person_keypoints.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    keypoints.write_text(json.dumps({"images": images, "annotations": kp_anns, "categories": [person]}))
    return instances, keypoints


def perfect_predictions() -> dict[int, dict[str, torch.Tensor]]:
    """The model-output form of the ground truth: xyxy boxes, contiguous labels, mask probabilities."""
    preds = {}
    for image_id, objs in _objects().items():
        boxes, labels, masks, kps = [], [], [], []
        for cat, m, k in objs:
            x, y, w, h = mask_util.toBbox(mask_util.encode(np.asfortranarray(m))).tolist()
            boxes.append([x, y, x + w, y + h])
            labels.append(CATEGORY_IDS.index(cat) + 1)
            masks.append(torch.from_numpy(m).float() * 0.5 + 0.3)  # 0.8 inside, 0.3 outside
            kps.append(torch.tensor(k).view(17, 3) if k is not None else torch.zeros(17, 3))
        n = len(objs)
        preds[image_id] = {
            "boxes": torch.tensor(boxes),
            "scores": torch.linspace(0.9, 0.6, n),
            "labels": torch.tensor(labels),
            "masks": torch.stack(masks)[:, None],
            "keypoints": torch.stack(kps),
        }
    return preds


def noisy_predictions() -> dict[int, dict[str, torch.Tensor]]:
    """Perfect predictions with jittered boxes/keypoints and one false positive per image (AP < 1)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for image_id, p in perfect_predictions().items():
        n = p["boxes"].shape[0]
        boxes = p["boxes"] + torch.randn(n, 4, generator=gen) * 3
        fp = torch.tensor([[5.0, 60.0, 45.0, 100.0]])
        kps = p["keypoints"].clone()
        kps[..., :2] += torch.randn(n, 17, 2, generator=gen) * 2
        out[image_id] = {
            "boxes": torch.cat([boxes, fp]),
            "scores": torch.cat([torch.rand(n, generator=gen), torch.tensor([0.95])]),
            "labels": torch.cat([p["labels"], torch.tensor([1])]),
            "masks": torch.cat([p["masks"], torch.zeros(1, 1, H, W)]),
            "keypoints": torch.cat([kps, torch.zeros(1, 17, 3)]),
        }
    return out


@pytest.fixture()
def gt_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_gt(tmp_path / "gt")


# --------------------------------------------------------------------------------------------------
# Peer cases
# --------------------------------------------------------------------------------------------------


def test_segm_peer_case_reproduced(tmp_path: Path) -> None:
    case = json.loads((DATA / "coco_segm_fce_case.json").read_text())
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(case["gt"]))
    sizes = {im["id"]: (im["height"], im["width"]) for im in case["gt"]["images"]}
    # The case's procedure: detections rebuilt without bbox/area, polygons merged into one RLE.
    dt = []
    for d in case["dt"]:
        h, w = sizes[d["image_id"]]
        rle = mask_util.merge(mask_util.frPyObjects(d["segmentation"], h, w))
        dt.append(
            {k: d[k] for k in ("image_id", "category_id", "iscrowd", "id", "score")} | {"segmentation": rle}
        )
    res = evaluate_coco(gt_path, dt, "segm")
    expected = case["expected_pycocotools_stats12"]
    assert list(res["stats"]) == [
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    ]
    assert list(res["stats"].values()) == pytest.approx(expected, abs=1e-10)  # the case's places=10
    assert res["stats"]["APm"] != pytest.approx(0.7920792079207921)  # the value with bbox-derived areas
    # The same results with str counts, read from a file, as our results files hold them.
    for d in dt:
        d["segmentation"] = dict(d["segmentation"], counts=d["segmentation"]["counts"].decode("ascii"))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    res_file = evaluate_coco(gt_path, tmp_path / "dt.json", "segm")
    assert list(res_file["stats"].values()) == pytest.approx(expected, abs=1e-10)
    assert set(res["per_category_ap"]) == {c["name"] for c in case["gt"]["categories"]}


def test_keypoints_peer_case_reproduced(tmp_path: Path) -> None:
    case = json.loads((DATA / "coco_keypoints_fce_case.json").read_text())
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(case["gt"]))
    res = evaluate_coco(gt_path, case["dt"], "keypoints")
    assert list(res["stats"]) == ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert list(res["stats"].values()) == case["expected_stats"]  # the case asserts exact equality
    assert res["per_category_ap"] == {"person": pytest.approx(case["expected_stats"][0])}


# --------------------------------------------------------------------------------------------------
# Our conversion round trip
# --------------------------------------------------------------------------------------------------


def test_perfect_predictions_give_ap_one(gt_files: tuple[Path, Path], tmp_path: Path) -> None:
    instances, keypoints = gt_files
    results = predictions_to_coco_results(perfect_predictions(), CATEGORY_IDS, keypoint_category_ids=[PERSON])
    assert set(results) == {"bbox", "segm", "keypoints"}
    assert len(results["bbox"]) == len(results["segm"]) == 7
    assert [r["category_id"] for r in results["keypoints"]] == [PERSON, PERSON]
    assert results["bbox"][0]["bbox"] == pytest.approx([10.0, 10.0, 18.0, 18.0])  # xywh
    assert isinstance(results["segm"][0]["segmentation"]["counts"], str)
    assert "bbox" not in results["segm"][0]

    ev = evaluate_all(instances, keypoints, results, tmp_path / "out")
    for task, n in (("bbox", 12), ("segm", 12), ("keypoints", 10)):
        assert len(ev[task]["stats"]) == n
        assert all(v == pytest.approx(1.0) for v in ev[task]["stats"].values()), (task, ev[task]["stats"])
    assert ev["bbox"]["per_category_ap"] == {n: pytest.approx(1.0) for n in CATEGORY_NAMES}
    assert ev["keypoints"]["per_category_ap"] == {"person": pytest.approx(1.0)}
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written == ev
    for task in ("bbox", "segm", "keypoints"):
        assert json.loads((tmp_path / "out" / f"coco_results_{task}.json").read_text()) == results[task]


def test_per_category_ap_and_box_only_model(gt_files: tuple[Path, Path]) -> None:
    instances, _ = gt_files
    preds = perfect_predictions()
    for p in preds.values():
        del p["masks"], p["keypoints"]
        p["boxes"][p["labels"] == 2] += 30.0  # every disk box moved far off its object
    results = predictions_to_coco_results(preds, CATEGORY_IDS)
    assert set(results) == {"bbox"}  # no mask/keypoint outputs -> no segm/keypoint tasks
    ev = evaluate_all(instances, None, results, None)
    assert ev["bbox"]["per_category_ap"] == {
        "square": pytest.approx(1.0),
        "disk": 0.0,
        "person": pytest.approx(1.0),
    }
    assert ev["bbox"]["stats"]["AP"] == pytest.approx(2 / 3)


def test_mask_threshold_and_shapes() -> None:
    pred = {
        "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
        "scores": torch.tensor([0.7]),
        "labels": torch.tensor([3]),
        "masks": torch.full((1, 1, 6, 8), 0.4),
        "keypoints": torch.zeros(1, 17, 3),
    }
    pred["masks"][0, 0, 1:3, 2:5] = 0.6
    res = predictions_to_coco_results({7: pred}, CATEGORY_IDS, mask_threshold=0.5)
    decoded = mask_util.decode(res["segm"][0]["segmentation"])
    assert decoded.shape == (6, 8) and decoded.sum() == 6 and decoded[1:3, 2:5].all()
    assert res["keypoints"][0]["bbox"] == [0.0, 0.0, 4.0, 4.0] and len(res["keypoints"][0]["keypoints"]) == 51
    assert predictions_to_coco_results({7: pred}, CATEGORY_IDS, keypoint_category_ids=[2])["keypoints"] == []
    empty = {k: v[:0] for k, v in pred.items()}  # an image without detections
    assert predictions_to_coco_results({8: empty}, CATEGORY_IDS) == {"bbox": [], "segm": [], "keypoints": []}
    bad = dict(pred, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="label 0 outside 1..3"):
        predictions_to_coco_results({7: bad}, CATEGORY_IDS)
    with pytest.raises(ValueError, match="image 7"):
        predictions_to_coco_results({7: dict(pred, scores=torch.tensor([0.7, 0.1]))}, CATEGORY_IDS)


# --------------------------------------------------------------------------------------------------
# Empty and bad inputs
# --------------------------------------------------------------------------------------------------


def test_empty_results_give_zero(gt_files: tuple[Path, Path], tmp_path: Path) -> None:
    instances, keypoints = gt_files
    for task in ("bbox", "segm"):
        res = evaluate_coco(instances, [], task)
        assert list(res["stats"].values()) == [0.0] * 12
        assert res["per_category_ap"] == {n: 0.0 for n in CATEGORY_NAMES}
    assert list(evaluate_coco(keypoints, [], "keypoints")["stats"].values()) == [0.0] * 10
    (tmp_path / "empty.json").write_text("[]")
    assert evaluate_coco(instances, tmp_path / "empty.json", "bbox")["stats"]["AP"] == 0.0
    # pycocotools' convention stays: an area range without any GT is -1, not 0.
    case = json.loads((DATA / "coco_segm_fce_case.json").read_text())
    (tmp_path / "fce_gt.json").write_text(json.dumps(case["gt"]))
    stats = evaluate_coco(tmp_path / "fce_gt.json", [], "segm")["stats"]
    assert stats["APs"] == -1.0 and stats["AP"] == 0.0 and stats["APm"] == 0.0


def _one_line_error(gt: Path, results: object, task: str) -> str:
    with pytest.raises(EvaluationError) as info:
        evaluate_coco(gt, results, task)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_results_errors(gt_files: tuple[Path, Path], tmp_path: Path) -> None:
    instances, keypoints = gt_files
    not_json = tmp_path / "results.json"
    not_json.write_text("{this is not json")
    assert str(not_json) in _one_line_error(instances, not_json, "bbox")
    assert "not found" in _one_line_error(instances, tmp_path / "missing.json", "bbox")

    good = {"image_id": 1, "category_id": 2, "score": 0.5, "bbox": [1.0, 2.0, 3.0, 4.0]}
    rle = mask_util.encode(np.asfortranarray(_rect(1, 2, 4, 6)))
    good_segm = {k: v for k, v in good.items() if k != "bbox"}
    good_segm["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    cases = [
        ({"image_id": 1, "category_id": 2, "score": 0.5}, "bbox", "'bbox'"),
        (dict(good, category_id=99), "bbox", "'category_id' = 99"),
        (dict(good, image_id=12345), "bbox", "'image_id' = 12345"),
        (dict(good, bbox=[1, 2, 3]), "bbox", "'bbox'"),
        ({k: v for k, v in good.items() if k != "score"}, "bbox", "'score'"),
        (dict(good, score=float("nan")), "bbox", "'score'"),
        (good, "segm", "'segmentation'"),
        (dict(good_segm, segmentation=[[1, 2, 3, 4, 5, 6]]), "segm", "compressed RLE"),
        (dict(good_segm, segmentation={"size": [10, 10], "counts": "abc"}), "segm", "size [10, 10]"),
    ]
    for i, (result, task, needle) in enumerate(cases):
        path = tmp_path / f"bad_{i}.json"
        path.write_text(json.dumps([good if task == "bbox" else good_segm, result]))
        msg = _one_line_error(instances, path, task)
        assert str(path) in msg and needle in msg and "result 1" in msg, msg
    assert "known ids: 9" in _one_line_error(keypoints, [dict(good, keypoints=[0.0] * 51)], "keypoints")
    both = json.loads(instances.read_text())  # a GT with keypoint and non-keypoint categories
    both["categories"][2]["keypoints"] = KEYPOINT_NAMES
    for a in both["annotations"]:  # COCOeval reads the keypoints of every GT of a keypoint category
        if a["category_id"] == both["categories"][2]["id"]:
            a["keypoints"] = [0.0] * 51
    (tmp_path / "both.json").write_text(json.dumps(both))
    msg = _one_line_error(tmp_path / "both.json", [dict(good, keypoints=[0.0] * 51)], "keypoints")
    assert "has no keypoints" in msg and "only for [9]" in msg
    kp = dict(good, category_id=PERSON, keypoints=[0.0] * 50)
    assert "51 finite numbers" in _one_line_error(keypoints, [kp], "keypoints")
    assert "person_keypoints" in _one_line_error(instances, [kp], "keypoints")  # gt without keypoints
    with pytest.raises(EvaluationError, match="no keypoint ground truth"):
        evaluate_all(instances, None, {"bbox": [], "keypoints": []}, None)
    (tmp_path / "gt_bad.json").write_text(json.dumps({"images": []}))
    assert "'annotations'" in _one_line_error(tmp_path / "gt_bad.json", [], "bbox")


def test_format_eval_table(gt_files: tuple[Path, Path]) -> None:
    instances, keypoints = gt_files
    results = predictions_to_coco_results(noisy_predictions(), CATEGORY_IDS, keypoint_category_ids=[PERSON])
    ev = evaluate_all(instances, keypoints, results, None)
    table = format_eval_table(ev)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[1].split()[0] == "bbox" and lines[1].split()[1] == f"{100 * ev['bbox']['stats']['AP']:.1f}"
    kp_row = lines[3].split()
    assert kp_row[0] == "keypoints" and kp_row[4] == "-"  # no APs for keypoints
    assert kp_row[5] == f"{100 * ev['keypoints']['stats']['APm']:.1f}"
    assert any(line.startswith("segm AP per category: square") for line in lines)
    assert 0.0 < ev["bbox"]["stats"]["AP"] < 1.0


# --------------------------------------------------------------------------------------------------
# Accumulation and the distributed gather
# --------------------------------------------------------------------------------------------------


def _evaluator(instances: Path, keypoints: Path) -> COCOEvaluator:
    # keypoint_category_ids left out on purpose: the evaluator keeps keypoints of person only,
    # reading the keypoint categories from the keypoint GT file.
    return COCOEvaluator(gt_instances=instances, gt_keypoints=keypoints, coco_category_ids=CATEGORY_IDS)


def test_evaluator_single_process_matches_evaluate_all(gt_files: tuple[Path, Path], tmp_path: Path) -> None:
    instances, keypoints = gt_files
    preds = noisy_predictions()
    evaluator = _evaluator(instances, keypoints)
    evaluator.process([3], [preds[3]])
    evaluator.process([1, 2], [preds[1], preds[2]])
    with pytest.raises(EvaluationError, match="image id 2 was processed twice"):
        evaluator.process([2], [preds[2]])
    ev = evaluator.summarize(tmp_path / "out")
    direct = evaluate_all(
        instances,
        keypoints,
        predictions_to_coco_results(preds, CATEGORY_IDS, keypoint_category_ids=[PERSON]),
        None,
    )
    assert ev == direct
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == ev

    partial = _evaluator(instances, keypoints)
    partial.process([1, 3], [preds[1], preds[3]])
    with pytest.raises(
        EvaluationError, match=r"no predictions for 1 of 3 expected images \(e.g. ids \[2\]\)"
    ):
        partial.summarize()
    subset = COCOEvaluator(gt_instances=instances, coco_category_ids=CATEGORY_IDS, image_ids=[1, 3])
    subset.process([1, 3], [{k: v for k, v in preds[i].items() if k != "keypoints"} for i in (1, 3)])
    assert set(subset.summarize()) == {"bbox", "segm"}


def test_gather_predictions_without_process_group() -> None:
    assert gather_predictions({1: "a", 2: "b"}) == {1: "a", 2: "b"}
    assert gather_predictions({1: "a"}, expected_image_ids=[1]) == {1: "a"}
    with pytest.raises(EvaluationError, match="not expected"):
        gather_predictions({1: "a", 5: "b"}, expected_image_ids=[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        instances, keypoints = (
            Path(root) / "gt" / "instances.json",
            Path(root) / "gt" / "person_keypoints.json",
        )
        preds = noisy_predictions()
        outcome = {}
        # Disjoint shards, as the inference sampler gives them.
        evaluator = _evaluator(instances, keypoints)
        shard = [[1, 2], [3]][rank]
        evaluator.process(shard, [preds[i] for i in shard])
        outcome["disjoint"] = evaluator.summarize(Path(root) / "dist_out" if rank == 0 else None)
        # Overlapping shards: image 2 on both ranks.
        evaluator = _evaluator(instances, keypoints)
        shard = [[1, 2], [2, 3]][rank]
        evaluator.process(shard, [preds[i] for i in shard])
        try:
            outcome["duplicate"] = evaluator.summarize()
        except EvaluationError as e:
            outcome["duplicate"] = f"error: {e}"
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_distributed_gather_matches_single_process(gt_files: tuple[Path, Path], tmp_path: Path) -> None:
    instances, keypoints = gt_files
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())

    single = _evaluator(instances, keypoints)
    preds = noisy_predictions()
    single.process([1, 2, 3], [preds[1], preds[2], preds[3]])
    expected = single.summarize()
    assert rank0["disjoint"] == expected
    assert set(expected) == {"bbox", "segm", "keypoints"}
    assert json.loads((tmp_path / "dist_out" / "eval.json").read_text()) == expected
    assert rank1["disjoint"] == {}
    assert rank0["duplicate"].startswith("error: image id 2 was predicted on rank 0 and rank 1")
    assert rank1["duplicate"] == {}
