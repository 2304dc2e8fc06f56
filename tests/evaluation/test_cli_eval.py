"""`megdet eval` (results files; checkpoints, ensembles, TTA, N processes) and `megdet predict`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO

from megdet.checkpoint import save_checkpoint
from megdet.cli import main
from megdet.config import config_to_dict, load_config
from megdet.data.synthetic import generate_synthetic_coco
from megdet.modeling import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

@pytest.fixture(scope="session")
def tiny(tiny_overrides: list[str]) -> list[str]:
    # One image per batch: then the images a rank batches together cannot matter when the
    # distributed run is compared with the single-process one.
    return [*tiny_overrides, "test.images_per_device=1", "test.tta.min_sizes=[64]", "train.device=cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny: list[str]) -> dict:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=4, num_val=5, image_size=96, seed=0, workers=1, progress=False)
    cfg = load_config(None, [f"data.root={root}", *tiny])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ckpt = root / "run" / "model_0000010.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": config_to_dict(cfg)})
    config_yaml = root / "tiny.yaml"
    (root / "tiny.yaml").write_text("")  # an empty config file: defaults + overrides on the command line
    return {"root": root, "cfg": cfg, "ckpt": ckpt, "config_yaml": config_yaml}


def _one_line_error(capsys: pytest.CaptureFixture, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("megdet: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------------------------------
# eval --annotations --results
# --------------------------------------------------------------------------------------------------


def _perfect_results(gt_path: Path, task: str) -> list[dict]:
    coco = COCO(str(gt_path))
    out = []
    for ann in coco.dataset["annotations"]:
        r = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if task == "bbox":
            r["bbox"] = ann["bbox"]
        elif task == "segm":
            rle = coco.annToRLE(ann)
            counts = rle["counts"]
            r["segmentation"] = {
                "size": rle["size"],
                "counts": counts.decode() if isinstance(counts, bytes) else counts,
            }
        else:
            r["keypoints"], r["bbox"] = ann["keypoints"], ann["bbox"]
        out.append(r)
    return out


@pytest.mark.parametrize(
    ("task", "gt_name", "explicit"),
    [
        ("bbox", "instances_val.json", True),
        ("segm", "instances_val.json", False),
        ("keypoints", "person_keypoints_val.json", False),
    ],
)
def test_eval_results_file_from_ground_truth_gives_ap_1(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture, task: str, gt_name: str, explicit: bool
) -> None:
    gt = setup["root"] / "annotations" / gt_name
    results = tmp_path / f"{task}.json"
    results.write_text(json.dumps(_perfect_results(gt, task)))
    argv = ["eval", "--annotations", str(gt), "--results", str(results)]
    argv += ["--iou-type", task] if explicit else []  # otherwise told by the results' fields
    assert main(argv) == 0
    evals = json.loads((tmp_path / "eval" / "eval.json").read_text())  # default: next to the results
    assert list(evals) == [task]
    assert evals[task]["stats"]["AP"] == pytest.approx(1.0)
    assert "100.0" in capsys.readouterr().out


def test_eval_results_file_errors_are_one_line(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gt = setup["root"] / "annotations" / "instances_val.json"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 12345, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    err = _one_line_error(capsys, main(["eval", "--annotations", str(gt), "--results", str(bad)]))
    assert "12345" in err and str(bad) in err
    _one_line_error(capsys, main(["eval", "--annotations", str(gt)]))
    err = _one_line_error(capsys, main(["eval"]))
    assert "--weights" in err


# --------------------------------------------------------------------------------------------------
# eval --weights
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _eval_worker(rank: int, port: int, argv: list[str]) -> None:
    # What the local launcher sets for each worker; the CLI then runs as rank `rank` of 2.
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    os._exit(main(argv))


def test_eval_checkpoint_single_and_two_processes_agree(setup: dict, capsys: pytest.CaptureFixture) -> None:
    ckpt = setup["ckpt"]
    assert main(["eval", "--weights", str(ckpt)]) == 0
    single_dir = ckpt.parent / "eval"  # default: next to the weights
    single = json.loads((single_dir / "eval.json").read_text())
    assert set(single) == {"bbox", "segm", "keypoints"}
    assert "bbox" in capsys.readouterr().out

    # Two gloo workers running the CLI as the launcher would start them; 5 images do not divide by
    # 2. Forked rather than spawned: a fresh interpreter importing torch costs ~15 s on this machine.
    out = ckpt.parent / "eval2"
    argv = ["eval", "--weights", str(ckpt), "--nproc", "2", "--out", str(out)]
    ctx = mp.get_context("fork")
    port = _free_port()
    workers = [ctx.Process(target=_eval_worker, args=(rank, port, argv)) for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=240)
    codes = [w.exitcode for w in workers]
    for w in workers:
        if w.is_alive():
            w.kill()
    assert codes == [0, 0], capsys.readouterr().err[-3000:]

    timing = json.loads((out / "timing.json").read_text())
    assert timing["ranks"] == 2 and timing["images"] == 5
    double = json.loads((out / "eval.json").read_text())
    assert set(double) == set(single)
    for task in single:
        assert double[task]["stats"] == pytest.approx(single[task]["stats"], abs=1e-9)
        assert double[task]["per_category_ap"] == pytest.approx(single[task]["per_category_ap"], abs=1e-9)
        a = json.loads((single_dir / f"coco_results_{task}.json").read_text())
        b = json.loads((out / f"coco_results_{task}.json").read_text())
        assert [(r["image_id"], r["category_id"]) for r in a] == [
            (r["image_id"], r["category_id"]) for r in b
        ]
        assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-6)
    ids = {r["image_id"] for r in json.loads((out / "coco_results_bbox.json").read_text())}
    assert len(ids) == 5  # each image once (the evaluator refuses duplicates and gaps)


def test_eval_nproc_starts_the_local_launcher(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import megdet.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed, "launch_local", lambda n, argv: calls.append((n, argv)) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["eval", "--weights", str(setup["ckpt"]), "--nproc", "3", "--tta", "test.max_images=2"]
    assert main(argv) == 0
    assert calls == [(3, ["eval", "--weights", str(setup["ckpt"]), "--tta", "test.max_images=2"])]


def test_eval_nproc_with_a_missing_checkpoint_is_one_line_before_any_worker(
    setup: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import megdet.distributed as distributed

    monkeypatch.setattr(distributed, "launch_local", lambda n, argv: pytest.fail("workers were started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    missing = str(setup["root"] / "nope.pt")
    err = _one_line_error(capsys, main(["eval", "--weights", str(setup["ckpt"]), "--weights", missing, "--nproc", "2"]))
    assert err == f"megdet: error: {missing}: checkpoint file not found"


def test_eval_ensemble_with_tta(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A copy of the checkpoint in its own folder, for the default output folder next to it.
    ckpt = tmp_path / "run" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(setup["ckpt"].read_bytes())
    argv = ["eval", "--weights", str(ckpt), "--weights", str(ckpt), "--tta", "test.max_images=2"]
    assert main(argv) == 0
    out = tmp_path / "run" / "eval_ensemble_tta"  # default: never the plain eval/ folder
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["eval_ensemble_tta", "model.pt"]
    assert set(json.loads((out / "eval.json").read_text())) == {"bbox", "segm", "keypoints"}
    timing = json.loads((out / "timing.json").read_text())
    assert timing["models"] == 2 and timing["tta"] and timing["images"] == 2
    assert "TTA ensemble of 2" in capsys.readouterr().out


def test_an_ensemble_of_different_categories_is_one_line(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture, tiny: list[str]
) -> None:
    other = tmp_path / "other.pt"
    cfg = load_config(None, [f"data.root={setup['root']}", *tiny, "model.num_classes=3"])
    save_checkpoint(other, {"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)})
    err = _one_line_error(capsys, main(["eval", "--weights", str(setup["ckpt"]), "--weights", str(other)]))
    assert f"classes per checkpoint: {setup['ckpt']} ({setup['cfg'].model.num_classes}), {other} (3)" in err


def test_eval_with_a_config_that_does_not_fit_is_one_line(
    setup: dict, capsys: pytest.CaptureFixture, tiny: list[str]
) -> None:
    argv = ["eval", "--config", str(setup["config_yaml"]), "--weights", str(setup["ckpt"]), *tiny]
    argv += [f"data.root={setup['root']}", "model.fpn_channels=16"]
    err = _one_line_error(capsys, main(argv))
    assert "shape mismatch" in err and str(setup["ckpt"]) in err


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def test_predict_writes_drawings_and_json(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = sorted((setup["root"] / "val").glob("*.png"))[:2]
    copy = tmp_path / "other" / images[0].name  # same file name in another folder
    copy.parent.mkdir()
    copy.write_bytes(images[0].read_bytes())
    out = tmp_path / "pred"
    argv = ["predict", "--weights", str(setup["ckpt"]), "--score-threshold", "0.0", "--out", str(out)]
    assert main([*argv, *map(str, images), str(copy)]) == 0

    everything = json.loads((out / "predictions.json").read_text())
    assert [e["image"] for e in everything] == [str(images[0]), str(images[1]), str(copy)]
    names = [images[0].stem, images[1].stem, images[0].stem + "_1"]
    for name, entry, src in zip(names, everything, [images[0], images[1], copy]):
        drawn = np.array(Image.open(out / f"{name}.png"))
        original = np.array(Image.open(src).convert("RGB"))
        assert drawn.shape == original.shape and not np.array_equal(drawn, original)
        assert json.loads((out / f"{name}.json").read_text()) == entry
        dets = entry["detections"]
        assert dets and all({"box", "label", "category_id", "score", "mask"} <= set(d) for d in dets)
        # Keypoints only for persons (the only category whose annotations define keypoints).
        assert all(("keypoints" in d) == (d["label"] == "person") for d in dets)
        h, w = original.shape[:2]
        assert (entry["height"], entry["width"]) == (h, w)
        assert all(d["mask"]["size"] == [h, w] for d in dets)
        assert all(
            0 <= d["box"][0] <= d["box"][2] <= w and 0 <= d["box"][1] <= d["box"][3] <= h for d in dets
        )
        assert {d["label"] for d in dets} <= {
            "circle",
            "triangle",
            "rectangle",
            "star",
            "ring",
            "cross",
            "person",
        }
    capsys.readouterr()

    err = _one_line_error(capsys, main([*argv, str(images[0]), str(tmp_path / "missing.png")]))
    assert "missing.png" in err and "not found" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    err = _one_line_error(capsys, main([*argv, str(broken)]))
    assert "broken.png" in err and "cannot decode" in err
