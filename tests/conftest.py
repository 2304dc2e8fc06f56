"""The ``cuda`` marker: tests that need CUDA devices, skipped on machines without them (CI has none).

``@pytest.mark.cuda`` needs one CUDA device, ``@pytest.mark.cuda(gpus=2)`` two. ``make test-cuda`` runs
only these (on a GPU machine); their CPU counterparts run everywhere with the same helpers.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda(gpus=1): needs that many CUDA devices; skipped without them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            continue
        needed = int(marker.kwargs.get("gpus", 1))
        if available < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA device(s), {available} visible"))
