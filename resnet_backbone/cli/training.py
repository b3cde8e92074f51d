"""Deprecated: the fine-tuning loop (``TrainingOptions``, ``fit``, ...) lives in
:mod:`resnet_backbone.training.engine`; this path forwards there, with a ``DeprecationWarning``, for one release."""

from .deprecated import forward_to

__getattr__ = forward_to("resnet_backbone.training.engine", __name__)
