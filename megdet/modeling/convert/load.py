"""Loading converted weights into a megdet model or ResNet body, with a report of what went where.

Everything the model has must come from the file, except, when fine-tuning (``allow_new_heads``):
class-sized tensors of another size (re-initialised: the model keeps its fresh initialisation), a mask
or keypoint head, semantic branch or RoI-head context the file lacks, and everything but the ResNet
body when the file is an ImageNet backbone. Such a part of the file that the model does not have is
left unused. Anything else
that does not fit is a one-line WeightsError naming the tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from megdet.modeling.convert.convert import CLASS_TENSORS, HEADS, Conversion, convert_state, rename_state
from megdet.modeling.convert.errors import WeightsError
from megdet.modeling.convert.files import read_weights, recorded_input_format

BODY_PREFIX = "backbone.body."
PARTS = (
    ("backbone", "backbone.body."),
    ("FPN", "backbone.fpn."),
    ("RPN", "rpn."),
    ("box head", "roi_heads.box_head."),
    ("mask head", "roi_heads.mask_head."),
    ("keypoint head", "roi_heads.keypoint_head."),
    ("semantic branch", "semantic_branch."),
)


def part_of(key: str) -> str:
    """The part of a GeneralizedRCNN a state_dict key belongs to (for reports)."""
    return next((name for name, prefix in PARTS if key.startswith(prefix)), "other")


def _short(names: list[str], limit: int = 4) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _by_part(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        counts[part_of(k)] = counts.get(part_of(k), 0) + 1
    return ", ".join(f"{name} {n}" for name, n in counts.items())


@dataclass
class WeightsReport:
    """What :func:`load_converted` did, tensor names in megdet's (model-level) names."""

    path: str
    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # class-sized, another size: fresh init kept
    initialised: list[str] = field(default_factory=list)  # parts the file does not have
    left: list[str] = field(default_factory=list)  # the file's heads the model does not have
    ignored: list[str] = field(default_factory=list)  # source keys dropped on purpose (source names)
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, str] = field(default_factory=dict)  # re-initialised tensor -> "file (..), model (..)"

    def summary(self) -> str:
        """One line: counts of every group."""
        parts = [f"{self.path}: loaded {len(self.loaded)} tensors of {self.source} weights"]
        if self.reinitialised:
            parts.append(f"re-initialised {len(self.reinitialised)} class-sized ({_by_part(self.reinitialised)})")
        if self.initialised:
            parts.append(f"initialised {len(self.initialised)} not in the file ({_by_part(self.initialised)})")
        if self.left:
            parts.append(f"left {len(self.left)} unused ({_by_part(self.left)})")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}")
        return "; ".join(parts)

    def lines(self) -> list[str]:
        """The report for people: each group by part, the re-initialised tensors with their sizes."""
        out = [f"converted from {self.source}: {self.path}"]
        out.append(f"  loaded {len(self.loaded)}: {_by_part(self.loaded)}")
        for key in self.reinitialised:
            out.append(f"  re-initialised for fine-tuning: {key} ({self.sizes.get(key, 'another size')})")
        if self.initialised:
            out.append(f"  initialised (not in the file) {len(self.initialised)}: {_by_part(self.initialised)}")
        if self.left:
            out.append(f"  left unused (the model has no such head) {len(self.left)}: {_by_part(self.left)}")
        if self.ignored:
            out.append(f"  ignored {len(self.ignored)}: {_short(self.ignored, 6)}")
        out += [f"  {note}" for note in self.notes]
        return out


def _head(key: str) -> str | None:
    return next((name for name, prefix in HEADS.items() if key.startswith(prefix)), None)


def _fit(
    own: Mapping[str, Tensor], given: Mapping[str, Tensor], conv: Conversion, allow_new_heads: bool
) -> tuple[WeightsReport, list[str]]:
    """Sorts every tensor of the model and of the file into the report's groups; returns the problems."""
    report = WeightsReport("", conv.source, ignored=list(conv.ignored), notes=list(conv.notes))
    heads_in_file = {_head(k) for k in given} - {None}
    heads_in_model = {_head(k) for k in own} - {None}
    mismatched, missing, unexpected = [], [], []
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key in given:
            shapes = f"file {tuple(given[key].shape)}, model {tuple(value.shape)}"
            if given[key].shape == value.shape:
                report.loaded.append(key)
            elif allow_new_heads and key in CLASS_TENSORS:
                report.reinitialised.append(key)
                report.sizes[key] = shapes
            else:
                mismatched.append(f"{key} ({shapes})")
        elif allow_new_heads and (
            (conv.backbone_only and not key.startswith(BODY_PREFIX)) or _head(key) in heads_in_model - heads_in_file
        ):
            report.initialised.append(key)
        else:
            missing.append(key)
    for key in given:
        if key not in own:
            if _head(key) is not None and _head(key) not in heads_in_model:
                report.left.append(key)
            else:
                unexpected.append(key)
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_short(mismatched, 3)}")
    if missing:
        problems.append(f"missing: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_short(unexpected)}")
    return report, problems


def load_converted(
    model: nn.Module, conv: Conversion, *, allow_new_heads: bool = True, where: str = ""
) -> WeightsReport:
    """Loads ``conv`` into a GeneralizedRCNN (see the module doc); ``where`` prefixes messages."""
    own = model.state_dict()
    given = {BODY_PREFIX + k: v for k, v in conv.state.items()} if conv.backbone_only else conv.state
    report, problems = _fit(own, given, conv, allow_new_heads)
    if problems:
        hint = _backbone_hint(given, model) or _norm_hint(own, given)
        raise WeightsError(f"{where}does not fit the model: {'; '.join(problems)}{hint}")
    with torch.no_grad():
        model.load_state_dict({k: given[k] for k in report.loaded}, strict=False)
    report.path = where.rstrip(": ")
    return report


def load_body(body: nn.Module, conv: Conversion, where: str = "") -> WeightsReport:
    """Loads the ResNet body of ``conv`` (an ImageNet file, or a detector's body) into a ResNetBody."""
    given = conv.state if conv.backbone_only else {
        k[len(BODY_PREFIX):]: v for k, v in conv.state.items() if k.startswith(BODY_PREFIX)
    }  # fmt: skip
    body_only = Conversion(conv.source, given, True, conv.ignored, conv.notes)
    report, problems = _fit(body.state_dict(), given, body_only, allow_new_heads=False)
    if problems:
        name = getattr(body, "name", "the ResNet body")
        found = resnet_name(given)
        hint = f" (the file holds a {found})" if found and found != name else ""
        raise WeightsError(f"{where}does not fit backbone {name}: {'; '.join(problems)}{hint}")
    with torch.no_grad():
        body.load_state_dict({k: given[k] for k in report.loaded}, strict=False)
    report.path = where.rstrip(": ")
    return report


def _backbone_hint(given: Mapping[str, Tensor], model: nn.Module) -> str:
    body = {k[len(BODY_PREFIX):]: v for k, v in given.items() if k.startswith(BODY_PREFIX)}
    found = resnet_name(body)
    name = getattr(getattr(getattr(model, "backbone", None), "body", None), "name", None)
    return f" (the file holds a {found} backbone, model.backbone is {name})" if found and name and found != name else ""


def _norm_hint(own: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str:
    """torchvision's and detectron2's FPN convs have a bias and no norm; a model with FPN norms does not
    take them."""
    norm, bare = "backbone.fpn.inner_blocks.0.1.weight", "backbone.fpn.inner_blocks.0.0.bias"
    if norm in own and bare in given:
        return " (the file's FPN and heads have no norm layers: use model.norm=FrozenBN or model.head_norm=none)"
    return ""


@functools.cache
def _resnet_fingerprints() -> dict[str, dict[str, tuple[int, ...]]]:
    """Conv weight shapes of every megdet backbone, by ResNetBody name (built on the meta device)."""
    from megdet.modeling.backbone import RESNETS

    out = {}
    for name, make in RESNETS.items():
        with torch.device("meta"):
            state = make(weights=None).state_dict()
        body, _ = rename_state(state, "torchvision-resnet")
        out[name] = {k: tuple(v.shape) for k, v in body.items() if v.dim() == 4}
    return out


def resnet_name(body_state: Mapping[str, Tensor]) -> str | None:
    """The backbone (:data:`~megdet.modeling.backbone.RESNETS` name) whose conv shapes ``body_state``
    (ResNetBody names) has, or None."""
    convs = {k: tuple(v.shape) for k, v in body_state.items() if v.dim() == 4}
    # stride_in_1x1 moves a stride, not a weight: the shapes identify the network alone.
    return next((name for name, shapes in _resnet_fingerprints().items() if shapes == convs), None)


def load_weights(
    model: nn.Module, path: str | Path, *, allow_new_heads: bool = True, input_format: str | None = None
) -> WeightsReport:
    """Reads, converts and loads any weights file megdet knows into a GeneralizedRCNN (``model.weights``)."""
    wf = read_weights(path)
    conv = convert_state(wf.state, input_format=input_format or recorded_input_format(wf), where=f"{path}: ")
    return load_converted(model, conv, allow_new_heads=allow_new_heads, where=f"{path}: ")


def load_backbone_file(body: nn.Module, path: str | Path, input_format: str | None = None) -> WeightsReport:
    """Reads, converts and loads the ResNet body of any weights file megdet knows into a ResNetBody."""
    wf = read_weights(path)
    conv = convert_state(wf.state, input_format=input_format or recorded_input_format(wf), where=f"{path}: ")
    return load_body(body, conv, where=f"{path}: ")
