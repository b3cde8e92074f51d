"""The adapters' contract with the core: what a framework adapter builds on that users of the models do not call.

Adapters (``resnet_backbone.adapters.*``) import the core only from ``resnet_backbone`` (the users' API),
``resnet_backbone.weights`` (checkpoints) and this module; import-linter's contract in pyproject.toml holds them
to it, so a name here is one the core keeps stable for adapters.

- :class:`ResNetTrunk` is the network to build on, with its one stage loop (``iter_stages``, yielding
  :class:`StageOutput`) and :func:`check_pixel_values`, its input check;
- :func:`align_out_features` resolves ``out_features`` / ``out_indices`` as the config does;
- ``NORM_TYPES`` are the norm layers the trunk builds, ``GROUP_NORM_GROUPS`` the groups of its GroupNorm;
- :func:`close_match_hint` makes an error's "Did you mean ...?";
- :func:`check_opset` and :func:`save_checked_onnx` are the ONNX export's opset check and its staged, checked,
  all-or-nothing write, for an adapter whose models need another exporter.
"""

from .config import GROUP_NORM_GROUPS
from .export import LOWEST_OPSET, check_opset, save_checked_onnx
from .hints import close_match_hint
from .layers import NORM_TYPES
from .out_features import align_out_features
from .trunk import ResNetTrunk, StageOutput, check_pixel_values

__all__ = [
    "GROUP_NORM_GROUPS",
    "LOWEST_OPSET",
    "NORM_TYPES",
    "ResNetTrunk",
    "StageOutput",
    "align_out_features",
    "check_opset",
    "check_pixel_values",
    "close_match_hint",
    "save_checked_onnx",
]
