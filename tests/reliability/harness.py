"""Runs fault-injection cases in this process, with its address space limited (see faults.run_harness).

``python harness.py CASES.json``: each case is ``{"name", "kind": "cli", "argv": [...]}`` (``megdet``'s
``main``, in process), ``{"name", "kind": "dataset", "image_dir", "instances", ...}`` (``CocoDetection``
built for training with masks and keypoints, then every item loaded) or ``{"name", "kind": "code",
"code"}`` (Python to execute: the harness's own tests). Prints ``{"event": "start"}``
before and ``{"event": "done", "rc", "out", "err"}`` after each case, one JSON line each, flushed, so
that the parent can name the case a crash happened in. ``rc`` 0: fine; 1: ``data check`` found errors;
2: a one-line megdet error; 3: any other exception (a bug: a traceback instead of a one-line error).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
import traceback
import warnings

from megdet.cli import main  # noqa: E402  (imports first, then the limit)
from megdet.config import ConfigError
from megdet.data.coco import CocoDetection
from megdet.data.errors import DatasetError
from megdet.evaluation import coco_eval  # noqa: F401  (torch, pycocotools: imported before the limit)


def _limit_address_space(extra_bytes: int) -> None:
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = size_kb * 1024 + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run_cli(case: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(case["argv"])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue().strip()}


def _run_dataset(case: dict) -> dict:
    """Builds the dataset, runs ``verify_images`` (what the trainer does before the first step) when
    ``verify``, then loads every item; ``where`` says which stage a one-line error came from."""
    where = "construct"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = CocoDetection(
                case["image_dir"],
                case["instances"],
                case.get("keypoints"),
                train=case.get("train", True),
                with_masks=case.get("with_masks", True),
                with_keypoints=case.get("with_keypoints", True),
                allow_outside_images=case.get("allow_outside", False),
            )
            if case.get("verify"):
                where = "verify_images"
                ds.verify_images()
            where = "items"
            for i in range(len(ds)):
                ds[i]
    except (DatasetError, ConfigError) as e:
        return {"rc": 2, "out": "", "err": str(e), "where": where}
    return {"rc": 0, "out": f"{len(ds)} items", "err": "", "where": where}


def main_(path: str) -> None:
    _limit_address_space(int(float(os.environ.get("MEGDET_HARNESS_EXTRA_GIB", "1")) * 2**30))
    with open(path) as f:
        cases = json.load(f)
    for case in cases:
        print(json.dumps({"event": "start", "name": case["name"]}), flush=True)
        start = time.perf_counter()
        try:
            if case["kind"] == "code":  # the harness's own tests: crash or exhaust memory on purpose
                exec(case["code"], {})
                result = {"rc": 0, "out": "", "err": ""}
            else:
                result = _run_cli(case) if case["kind"] == "cli" else _run_dataset(case)
        except (DatasetError, ConfigError) as e:
            result = {"rc": 2, "out": "", "err": str(e)}
        except Exception as e:  # a traceback where a one-line error belongs
            result = {"rc": 3, "out": "", "err": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        seconds = round(time.perf_counter() - start, 3)
        print(json.dumps({"event": "done", "name": case["name"], "seconds": seconds, **result}), flush=True)


if __name__ == "__main__":
    main_(sys.argv[1])
