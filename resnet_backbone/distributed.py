"""Distributed training helpers: SyncBatchNorm conversion that respects frozen stages."""

from __future__ import annotations

import warnings

import torch.distributed
from torch import nn

from .trunk import ResNetTrunk


def convert_sync_batchnorm(model: nn.Module, process_group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """torch's ``SyncBatchNorm.convert_sync_batchnorm``, except inside the frozen stages of this project's
    backbones: their norms (BatchNorm kept in eval mode, or FrozenBatchNorm) stay as they are, so frozen
    stays frozen. Call it before wrapping the model in ``DistributedDataParallel``.

    Args:
        model: any model; the BatchNorms of backbones with ``norm_eval=True`` are converted too, with a warning
            that they will never synchronise (they stay in eval mode).
        process_group: the group to synchronise over (default: the whole world).

    Returns:
        The converted model: ``model`` itself, changed in place, unless ``model`` is a BatchNorm.

    Example::

        >>> from collections import Counter
        >>> from resnet_backbone import ResNetBackbone
        >>> from resnet_backbone.distributed import convert_sync_batchnorm
        >>> backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1], freeze_at=2)  # stem, stage1
        >>> backbone = convert_sync_batchnorm(backbone)
        >>> norms = Counter(type(module).__name__ for module in backbone.modules())
        >>> norms["BatchNorm2d"], norms["SyncBatchNorm"]
        (3, 9)
    """
    trunks = [module for module in model.modules() if isinstance(module, ResNetTrunk)]
    if any(trunk.config.norm_eval for trunk in trunks):
        warnings.warn(
            "Converting to SyncBatchNorm a backbone with norm_eval=True: its norms stay in eval mode and are "
            "never synchronised. Drop norm_eval, or do not convert.",
            stacklevel=2,
        )
    frozen = {id(stage) for trunk in trunks for stage in trunk.frozen_modules()}
    return _convert(model, frozen, process_group)


def _convert(module: nn.Module, frozen: set[int], process_group) -> nn.Module:
    if id(module) in frozen:
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, frozen, process_group))
    return module
