"""Weights from the model zoos users already have: torchvision and detectron2 detectors, ImageNet ResNets.

- :mod:`.files` / :mod:`.safe_pickle`: weight files -> ``{name: tensor}`` (``torch.load`` with
  ``weights_only=True``; pickles through an unpickler that rebuilds numpy arrays and nothing else);
- :mod:`.names`: the explicit name maps (torchvision, detectron2, MSRA / Caffe2 -> megdet);
- :mod:`.convert`: renaming plus the value changes that go with it (class order, BGR input, Caffe2 BN);
- :mod:`.load`: loading into a model or ResNet body with a report (``model.weights``);
- :mod:`.checkpoint`: a foreign detector file -> a megdet checkpoint with its config (``megdet convert``,
  ``--weights`` of ``megdet eval`` / ``predict``).

:mod:`.checkpoint` builds models, so it is not imported here (the model builder imports this package).
"""

from megdet.modeling.convert.convert import Conversion, convert_state
from megdet.modeling.convert.errors import WeightsError
from megdet.modeling.convert.files import WeightsFile, read_weights
from megdet.modeling.convert.load import (
    WeightsReport,
    load_backbone_file,
    load_body,
    load_converted,
    load_weights,
    resnet_name,
)
from megdet.modeling.convert.names import NAME_MAPS, detect_source

__all__ = [
    "NAME_MAPS",
    "Conversion",
    "WeightsError",
    "WeightsFile",
    "WeightsReport",
    "convert_state",
    "detect_source",
    "load_backbone_file",
    "load_body",
    "load_converted",
    "load_weights",
    "read_weights",
    "resnet_name",
]
