"""megdet: large mini-batch FPN R-CNN training (boxes, masks, keypoints) after Megvii's MegDet."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "load_config", "Config"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import megdet` (and the CLI's --help) does not pay for importing torch.
    if name == "build_model":
        from megdet.modeling.detector import build_model

        return build_model
    if name in ("load_config", "Config"):
        from megdet import config

        return getattr(config, name)
    raise AttributeError(f"module 'megdet' has no attribute {name!r}")
