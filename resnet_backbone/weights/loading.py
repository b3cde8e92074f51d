"""Strict, all-or-nothing loading of a checkpoint in any supported layout into a model."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import NORM_TYPES
from .architecture import describe, infer_config, same_architecture
from .layouts import PeerLayout, peer_rules, strip_known_prefixes, strip_prefixes, to_canonical, translate_key

_STAGE_KEY = re.compile(r"encoder\.stages\.(\d+)\.")
_LAYOUT_NAMES = {
    None: "transformers",
    "torchvision": "torchvision/timm",
    "mmdet": "mmdet/mmseg",
    "detectron2": "detectron2",
}


@dataclass
class LoadReport:
    """What a load did with each checkpoint key that did not load one-to-one; ``str()`` lists them.

    Attributes:
        source_layout: the checkpoint's layout (``"transformers"``, ``"torchvision/timm"``, ...).
        missing_keys: model keys the checkpoint had no tensor for.
        unexpected_keys: checkpoint keys the model has no place for.
        mismatched_keys: ``(key, checkpoint shape, model shape)`` of each tensor of the wrong shape.
        dropped_classifier_keys: the checkpoint's classifier, which a model without a head does not take.
        dropped_stage_keys: stages that a backbone does not build (deeper than its ``out_features``).
    """

    source_layout: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped_classifier_keys: list[str] = field(default_factory=list)
    dropped_stage_keys: list[str] = field(default_factory=list)

    @property
    def is_exact(self) -> bool:
        """True when every tensor of the model came from the checkpoint and nothing else was there."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        lines = [f"loaded from a {self.source_layout} checkpoint"]
        for label, keys in [
            ("missing from the checkpoint", self.missing_keys),
            ("unexpected in the checkpoint", self.unexpected_keys),
            (
                "shape mismatch (checkpoint vs model)",
                [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched_keys],
            ),
            ("dropped classifier", self.dropped_classifier_keys),
            ("dropped (stages this backbone does not build)", self.dropped_stage_keys),
        ]:
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                lines.append(f"{label}: {shown}")
        return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """A strict load found missing, unexpected or mis-shaped keys; nothing was loaded.

    A ValueError, so the command line shows it as one line.

    Args:
        message: every problem and its likely cause.
        report: the :class:`LoadReport`, kept as ``report``.
    """

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


def load_checkpoint(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    norm_eps: Mapping[str, float] | None = None,
) -> LoadReport:
    """Load ``state_dict`` (transformers, torchvision, timm or mmdet layout) into ``model``.

    Strict: any missing, unexpected or mis-shaped key raises one error listing them all, with the likely
    cause, before anything is loaded. Not strict: what fits loads and the report lists the rest. Either
    way, classifier weights a backbone has no place for and stages it does not build are dropped and
    reported; ``num_batches_tracked`` is never required (frozen norms have none). ``norm_eps`` (the
    source model's norm epsilons, keyed by module path in the checkpoint's layout) is copied over.

    Args:
        model: one of this project's models (it reads ``model.config``).
        state_dict: the checkpoint's tensors, under any key prefix a wrapper adds (``module.``, ...).
        strict: all or nothing, as above.
        norm_eps: ``{"<module path>.eps": eps}`` of the source model's norms.

    Returns:
        The :class:`LoadReport`.

    Raises:
        CheckpointMismatchError: strict, and the checkpoint does not fit (with the likely cause: another
            architecture, another number of labels).
        ValueError: the keys are in no layout this package reads.
    """
    canonical, layout = to_canonical(state_dict)
    report = LoadReport(source_layout=_LAYOUT_NAMES[None if layout is None else layout.naming])
    model_keys = list(model.state_dict())
    model_key_of = dict(zip(strip_known_prefixes(dict.fromkeys(model_keys)), model_keys))
    placed = {}
    for key, value in canonical.items():
        model_key = model_key_of.get(key)
        if model_key is not None:
            placed[model_key] = value
        elif not key.endswith("num_batches_tracked"):
            _unplaced_keys(report, key, model_key_of, model).append(key)
    load_placed(
        model,
        placed,
        report,
        strict=strict,
        subject=f"{type(model).__name__} ({describe(model.config)})",
        likely_cause=lambda: _likely_cause(report, state_dict, model),
    )
    if norm_eps:
        _copy_norm_eps(model, norm_eps, layout)
    return report


def load_placed(
    model: nn.Module,
    placed: Mapping[str, torch.Tensor],
    report: LoadReport,
    *,
    strict: bool = True,
    subject: str | None = None,
    likely_cause: Callable[[], str | None] = lambda: None,
) -> LoadReport:
    """The all-or-nothing step every loader ends with, for tensors already under ``model``'s own keys.

    Adds to ``report`` the unexpected, missing and mis-shaped keys (``num_batches_tracked`` is never
    required). Strict and not exact: raises :class:`CheckpointMismatchError` naming them all, with
    ``likely_cause()`` when it has one, and loads nothing. Else loads what fits. An adapter whose model holds
    the trunk among modules of its framework (a detector's heads) maps the ResNet's keys with
    :func:`to_canonical`, keeps the rest as they are, and ends here, so it reports as every loader does.

    Args:
        model: the whole model.
        placed: tensors under ``model``'s own state-dict keys.
        report: the report to add to (its ``source_layout`` says where the tensors came from).
        strict: all or nothing.
        subject: how the error names the model (default: its class name).
        likely_cause: called only when the load fails, for the error's "Likely cause:" line.

    Returns:
        ``report``.

    Raises:
        CheckpointMismatchError: strict, and some key is missing, unexpected or mis-shaped.
    """
    model_state = model.state_dict()
    fitting = {}
    for key, value in placed.items():
        if key not in model_state:
            if not key.endswith("num_batches_tracked"):
                report.unexpected_keys.append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            report.mismatched_keys.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            fitting[key] = value
    report.missing_keys += [key for key in model_state if key not in placed and not key.endswith("num_batches_tracked")]
    if strict and not report.is_exact:
        lines = [f"The checkpoint does not fit {subject or type(model).__name__}; nothing was loaded."]
        lines.append(str(report).split("\n", 1)[1])
        cause = likely_cause()
        if cause:
            lines.append(f"Likely cause: {cause}")
        lines.append("Pass strict=False to load what fits and get this report as model.load_report instead.")
        raise CheckpointMismatchError("\n".join(lines), report)
    model.load_state_dict(fitting, strict=False)
    return report


def _unplaced_keys(report: LoadReport, key: str, model_key_of: Mapping[str, str], model: nn.Module) -> list[str]:
    """Which report list a checkpoint key with no place in the model belongs to."""
    if key.startswith("classifier.") and not any(k.startswith("classifier.") for k in model_key_of):
        return report.dropped_classifier_keys
    stage = _STAGE_KEY.match(key)
    if stage and int(stage[1]) < len(model.config.depths):
        if not any(k.startswith(f"encoder.stages.{stage[1]}.") for k in model_key_of):
            return report.dropped_stage_keys
    return report.unexpected_keys


def _likely_cause(report: LoadReport, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    try:
        checkpoint_config = infer_config(state_dict)
    except ValueError:
        checkpoint_config = None
    if checkpoint_config is not None and not same_architecture(checkpoint_config, model.config):
        return (
            f"this looks like a {describe(checkpoint_config)} checkpoint; the config is {describe(model.config)}. "
            "Load it with from_pretrained / from_torchvision / from_timm, which read the architecture from the "
            "checkpoint, or fix the config."
        )
    if any(key.endswith(("classifier.1.weight", "classifier.1.bias")) for key, _, _ in report.mismatched_keys):
        labels = checkpoint_config.num_labels if checkpoint_config else "a different number of"
        return (
            f"the checkpoint's classifier has {labels} labels and the config {model.config.num_labels}. "
            "Pass num_labels to match, or strict=False to keep a freshly initialised classifier."
        )
    return None


def _copy_norm_eps(model: nn.Module, norm_eps: Mapping[str, float], layout: PeerLayout | None) -> None:
    rules = [] if layout is None else [(peer, ours) for ours, peer in peer_rules(layout)]
    norms = dict(strip_known_prefixes({name: module for name, module in model.named_modules() if name}))
    for source_key, eps in norm_eps.items():
        module = norms.get(translate_key(strip_prefixes(source_key), rules).removesuffix(".eps"))
        if isinstance(module, NORM_TYPES) and hasattr(module, "eps"):
            module.eps = eps


def norm_eps_of(module: nn.Module) -> dict[str, float]:
    """``{"<module path>.eps": eps}`` for every norm layer of a (peer) model, for :func:`load_checkpoint`."""
    return {
        f"{name}.eps": float(norm.eps)
        for name, norm in module.named_modules()
        if hasattr(norm, "eps") and hasattr(norm, "running_var")
    }
