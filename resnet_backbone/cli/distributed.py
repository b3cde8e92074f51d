"""Deprecated: SyncBatchNorm conversion lives in :mod:`resnet_backbone.distributed`; this path forwards there,
with a ``DeprecationWarning``, for one release."""

from .deprecated import forward_to

__getattr__ = forward_to("resnet_backbone.distributed", __name__)
