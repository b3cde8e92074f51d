"""Deprecated: the ``torch.export`` and ONNX helpers live in :mod:`resnet_backbone.export`; this path forwards
there, with a ``DeprecationWarning``, for one release."""

from .deprecated import forward_to

__getattr__ = forward_to("resnet_backbone.export", __name__)
