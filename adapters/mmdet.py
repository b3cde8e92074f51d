"""OpenMMLab adapter: this backbone as ``type="RBResNet"`` in mmdetection and mmsegmentation configs.

Importing this module registers ``RBResNet`` in mmengine's root ``MODELS`` registry and, when they are
installed, in mmdet's and mmseg's, so one line in a config is enough::

    custom_imports = dict(imports=["resnet_backbone.adapters.mmdet"], allow_failed_imports=False)
    model = dict(backbone=dict(type="RBResNet", depth=50, frozen_stages=1, norm_eval=True, ...))

``RBResNet`` takes mmdet's ``ResNet`` arguments with their meaning and defaults (and mmdet's ResNeXt
``groups``/``base_width`` and mmseg's ``contract_dilation``). The network is this project's trunk, with its
stage loop; RBResNet's children are the trunk's convs and norms under mmdet's names (the weights package's
mmdet layout), so parameter names (an optimizer's ``paramwise_cfg.custom_keys``), ``named_modules`` and the
state dict are mmdet's ``ResNet``'s, and checkpoints trained with mmdet's or mmseg's ``ResNet`` load strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mmengine.registry import MODELS
from torch import Tensor, nn

from resnet_backbone import PRESETS, LoadReport, ResNetConfig
from resnet_backbone.adapter_api import GROUP_NORM_GROUPS, NORM_TYPES, ResNetTrunk, close_match_hint
from resnet_backbone.weights import (
    PeerLayout,
    from_canonical,
    load_checkpoint,
    peer_layout_of,
    read_state_dict,
    resolve_source,
)

__all__ = ["RBResNet"]

DEPTHS = (18, 34, 50, 101, 152)
# mmcv's norm types -> the core's norm_layer. The core's GroupNorm has 32 groups, as mmdet's GN configs.
_NORM_LAYERS = {"BN": "batch", "BN2d": "batch", "SyncBN": "sync_batch", "GN": "group"}
# Options of mmdet's and mmseg's ResNet that RBResNet does not implement: accepted only at these defaults.
_UNSUPPORTED = {
    "dcn": "deformable convolutions (dcn)",
    "stage_with_dcn": "deformable convolutions (stage_with_dcn)",
    "plugins": "plugins (attention blocks inside the residual blocks)",
    "conv_cfg": "conv_cfg (another convolution type)",
    "multi_grid": "mmseg's multi_grid dilations",
}


class RBResNet(nn.Module):
    """mmdet's ``ResNet`` (and ``ResNetV1d``, ``ResNeXt``, mmseg's ``ResNetV1c``) on this project's trunk.

    Arguments keep mmdet's meaning and defaults, so a config written for mmdet's ``ResNet`` builds the same
    network with ``type="RBResNet"``. Options RBResNet does not implement (``dcn``, ``stage_with_dcn``,
    ``plugins``, ``conv_cfg``, mmseg's ``multi_grid``) are refused with an error unless left at their defaults,
    never ignored.

    Args:
        depth: 18, 34, 50, 101 or 152 (or give ``preset``).
        in_channels: input channels.
        stem_channels: the stem's output channels (default ``base_channels``).
        base_channels: the first stage's width (its bottleneck's inner width), as mmdet.
        num_stages: 1 to 4 stages built.
        strides, dilations: per stage; they may trade the stride of the last stages for dilation, as mmdet's
            and mmseg's dilated configs do.
        out_indices: the stages returned, counted from 0.
        style: ``"pytorch"`` only (the stride in the 3x3 conv); ``"caffe"`` is refused.
        deep_stem, avg_down: ResNetV1c/V1d (three 3x3 stem convs; average-pool shortcuts).
        frozen_stages: -1 freezes nothing, 0 the stem, k the stem and stages 1..k.
        norm_cfg: ``dict(type=...)``, BN, SyncBN or GN (``num_groups=32``); ``requires_grad=False`` freezes the
            norms' affine parameters.
        norm_eval: keep every norm in eval mode while training.
        with_cp: gradient checkpointing.
        zero_init_residual: zero the last norm of each block.
        groups, base_width: ResNeXt's cardinality and width per group.
        contract_dilation: mmseg's: the first block of a dilated stage keeps half its dilation.
        preset: beyond mmdet: any of this project's presets, instead of ``depth``.
        output_stride: beyond mmdet: 8, 16 or 32, instead of ``strides`` / ``dilations``.
        pretrained: a checkpoint to load in :meth:`init_weights` (mmdet's older spelling of ``init_cfg``).
        init_cfg: ``dict(type="Pretrained", checkpoint=..., prefix=...)``: any checkpoint the weights package
            reads (mmdet's, torchvision's, timm's, this project's), a URL through mmengine's loader, a folder or
            a Hub id.
        other_options: mmdet's options listed above, accepted only at their defaults.

    Raises:
        TypeError: an argument mmdet's ResNet does not take (with a close match).
        ValueError: an option RBResNet does not implement, or a value mmdet would refuse.

    ``forward(x)`` returns the tuple of the ``out_indices`` feature maps. After :meth:`init_weights` loaded a
    checkpoint, ``load_report`` says what matched. ``trunk`` is the network that runs (this project's names);
    replace modules through RBResNet's (mmdet's) names, which reach the trunk, not the other way round.

    Example::

        >>> import torch
        >>> from resnet_backbone.adapters.mmdet import RBResNet
        >>> backbone = RBResNet(depth=18, base_channels=8, out_indices=(1, 3), frozen_stages=1)
        >>> backbone.channels, backbone.strides
        ([16, 64], [8, 32])
        >>> [tuple(f.shape) for f in backbone(torch.randn(1, 3, 64, 64))]
        [(1, 16, 8, 8), (1, 64, 2, 2)]
    """

    def __init__(
        self,
        depth: int | None = None,
        in_channels: int = 3,
        stem_channels: int | None = None,
        base_channels: int = 64,
        num_stages: int = 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        deep_stem: bool = False,
        avg_down: bool = False,
        frozen_stages: int = -1,
        norm_cfg: Mapping[str, Any] | None = None,
        norm_eval: bool = True,
        with_cp: bool = False,
        zero_init_residual: bool = True,
        groups: int = 1,
        base_width: int = 4,
        contract_dilation: bool = False,
        preset: str | None = None,
        output_stride: int | None = None,
        pretrained: str | None = None,
        init_cfg: Mapping[str, Any] | None = None,
        **other_options: Any,
    ) -> None:
        super().__init__()
        _refuse_unsupported(other_options)
        if style != "pytorch":
            raise ValueError(
                f"style must be 'pytorch', got {style!r}: RBResNet is ResNet v1.5, with the stride in the 3x3 "
                "conv; mmdet's 'caffe' style puts it in the first 1x1 conv (and its checkpoints expect caffe's "
                "BGR, unscaled inputs). Use mmdet's ResNet for caffe-style configs."
            )
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be 1, 2, 3 or 4 (as mmdet's ResNet), got {num_stages!r}.")
        self.out_indices = _check_out_indices(out_indices, num_stages)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"frozen_stages must be between -1 (nothing frozen) and num_stages={num_stages}: 0 freezes the "
                f"stem, k the stem and stages 1..k; got {frozen_stages!r}."
            )
        norm_layer, norm_requires_grad = _norm_layer(norm_cfg)
        architecture = (depth, preset, num_stages, in_channels, stem_channels, base_channels, deep_stem, avg_down)
        config = _architecture(*architecture, groups, base_width).with_overrides(
            **_stride_fields(strides, dilations, num_stages, output_stride),
            dilation_rule="mmseg" if contract_dilation else "mmdet",
            norm_layer=norm_layer,
            norm_eval=norm_eval,
            freeze_at=frozen_stages + 1,
            zero_init_residual=zero_init_residual,
        )
        trunk = ResNetTrunk(config)
        if output_stride is None:
            _check_strides(trunk, strides, dilations)
        if not norm_requires_grad:
            for module in trunk.modules():
                if isinstance(module, NORM_TYPES):
                    module.requires_grad_(False)
        trunk.set_grad_checkpointing(with_cp)
        # The trunk runs the network; RBResNet's children name its convs and norms as mmdet does (one set of
        # modules, two names), so the trunk stays out of the module tree.
        self.__dict__["trunk"] = trunk
        _name_as_mmdet(self, trunk, peer_layout_of(config, naming="mmdet"))
        self.init_cfg = _pretrained_init_cfg(pretrained, init_cfg)
        self.load_report: LoadReport | None = None

    @property
    def channels(self) -> list[int]:
        """Channels of each output, in ``out_indices`` order: a neck's ``in_channels``."""
        return [self.trunk.stage_specs[index + 1].channels for index in self.out_indices]

    @property
    def strides(self) -> list[int]:
        """Stride (input size / feature size) of each output, in ``out_indices`` order."""
        return [self.trunk.stage_specs[index + 1].stride for index in self.out_indices]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """The ``out_indices`` feature maps, in stage order (mmdet computes every stage, and so does this)."""
        stages = [output.hidden_state for output in self.trunk.iter_stages(x)][1:]
        return tuple(stages[index] for index in self.out_indices)

    def train(self, mode: bool = True) -> RBResNet:
        """Set train mode; the trunk keeps the norms of frozen stages (all of them, with ``norm_eval``) in eval
        mode, as mmdet's ``ResNet.train`` does."""
        super().train(mode)
        self.trunk.train(mode)
        return self

    def init_weights(self) -> None:
        """mmengine calls this once on the built model. With a ``Pretrained`` ``init_cfg``: load the checkpoint
        strictly through the weights package (any layout it reads, mmdet's included) and keep its report in
        ``load_report``. Else keep the construction's initialisation, which is mmdet's (Kaiming convs, unit
        norms, zeroed last norms with ``zero_init_residual``)."""
        if self.init_cfg is not None:
            state_dict = _read_checkpoint(self.init_cfg["checkpoint"])
            prefix = self.init_cfg.get("prefix")
            if prefix:
                state_dict = _under_prefix(state_dict, prefix)
            self.load_report = load_checkpoint(self.trunk, state_dict, strict=True)
        self.is_init = True


def _refuse_unsupported(options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        if name not in _UNSUPPORTED:
            known = [*list(inspect.signature(RBResNet).parameters)[:-1], *_UNSUPPORTED]
            raise TypeError(
                f"RBResNet got an unknown argument {name!r}.{close_match_hint(name, known)} It takes mmdet's "
                f"ResNet arguments: {', '.join(known)}."
            )
        if value is not None and not (name == "stage_with_dcn" and not any(value)):
            raise ValueError(
                f"RBResNet does not implement {_UNSUPPORTED[name]}: got {name}={value!r}. Leave it unset, or use "
                "mmdet's or mmseg's own ResNet for this config."
            )


def _check_out_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    valid = range(num_stages)
    if (
        not isinstance(out_indices, Sequence)
        or not out_indices
        or not all(isinstance(i, int) and i in valid for i in out_indices)
    ):
        raise ValueError(
            f"out_indices must be stage indices from 0 to {num_stages - 1} (num_stages={num_stages}; 0 is the "
            f"first stage after the stem, as mmdet counts), got {out_indices!r}."
        )
    return tuple(sorted(set(out_indices)))


def _norm_layer(norm_cfg: Mapping[str, Any] | None) -> tuple[str, bool]:
    """The core's ``norm_layer`` for mmcv's ``norm_cfg``, and its ``requires_grad``."""
    options = dict(type="BN", requires_grad=True) if norm_cfg is None else dict(norm_cfg)
    norm_type, requires_grad = options.pop("type", None), options.pop("requires_grad", True)
    if norm_type not in _NORM_LAYERS:
        raise ValueError(
            f"norm_cfg type must be one of {', '.join(_NORM_LAYERS)}, got {norm_type!r}."
            f"{close_match_hint(norm_type, _NORM_LAYERS)}"
        )
    if norm_type == "GN" and options.pop("num_groups", None) != GROUP_NORM_GROUPS:
        raise ValueError(f"norm_cfg type 'GN' needs num_groups={GROUP_NORM_GROUPS}, got {norm_cfg!r}.")
    if options:
        raise ValueError(
            f"norm_cfg options {sorted(options)} are not supported (only type, requires_grad and GN's "
            f"num_groups); got {norm_cfg!r}."
        )
    return _NORM_LAYERS[norm_type], bool(requires_grad)


def _architecture(
    depth: int | None,
    preset: str | None,
    num_stages: int,
    in_channels: int,
    stem_channels: int | None,
    base_channels: int,
    deep_stem: bool,
    avg_down: bool,
    groups: int,
    base_width: int,
) -> ResNetConfig:
    """The config of mmdet's ``ResNet(depth, ...)`` (or of a preset), cut to ``num_stages`` stages."""
    if (depth is None) == (preset is None):
        raise ValueError(
            f"Give depth ({', '.join(map(str, DEPTHS))}, as mmdet's ResNet) or preset (one of {', '.join(PRESETS)}), "
            f"not both nor neither; got depth={depth!r}, preset={preset!r}."
        )
    if preset is not None:
        if (stem_channels, base_channels, deep_stem, avg_down, groups) != (None, 64, False, False, 1):
            raise ValueError(
                f"preset={preset!r} sets the architecture: leave stem_channels, base_channels, deep_stem, avg_down "
                "and groups at their defaults, or give depth instead of preset."
            )
        config = ResNetConfig.from_preset(preset, num_channels=in_channels)
    else:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {', '.join(map(str, DEPTHS))} (as mmdet's ResNet), got {depth!r}.")
        config = ResNetConfig.from_preset(f"resnet{depth}")
        expansion = 4 if config.layer_type == "bottleneck" else 1
        if groups != 1 and expansion == 1:
            raise ValueError(f"groups={groups} (ResNeXt) needs a bottleneck depth (50, 101 or 152), got depth={depth}.")
        # mmdet's ResNeXt bottleneck is floor(planes * base_width / base_channels) * groups wide.
        width_per_group = 64 if groups == 1 else base_width * 64 / base_channels
        if width_per_group != int(width_per_group):
            raise ValueError(
                f"base_width={base_width} with base_channels={base_channels} gives bottleneck widths that are not "
                "whole multiples of the stage widths; use base_channels=64."
            )
        config = config.with_overrides(
            num_channels=in_channels,
            embedding_size=base_channels if stem_channels is None else stem_channels,
            hidden_sizes=[base_channels * 2**index * expansion for index in range(4)],
            stem_type="deep" if deep_stem else "default",
            avg_down=avg_down,
            groups=groups,
            width_per_group=int(width_per_group),
        )
    stages = dict(depths=config.depths[:num_stages], hidden_sizes=config.hidden_sizes[:num_stages])
    return config.with_overrides(**stages, out_indices=None)  # the trunk computes every stage it builds


def _stride_fields(
    strides: Sequence[int], dilations: Sequence[int], num_stages: int, output_stride: int | None
) -> dict[str, Any]:
    """``downsample_in_first_stage`` and ``output_stride`` for mmdet's ``strides``/``dilations``: a stage after
    the first with stride 1 trades its stride for dilation (mmdet's and mmseg's dilated configs)."""
    if len(strides) != num_stages or len(dilations) != num_stages:
        raise ValueError(
            f"strides and dilations need one entry per stage (num_stages={num_stages}), got strides={strides!r}, "
            f"dilations={dilations!r}."
        )
    if output_stride is not None:
        if tuple(strides) != (1, 2, 2, 2)[:num_stages] or any(d != 1 for d in dilations):
            raise ValueError(
                "Give output_stride or strides/dilations, not both: output_stride replaces the strides of the last "
                f"stages by dilation itself; got output_stride={output_stride}, strides={strides!r}, "
                f"dilations={dilations!r}."
            )
        return dict(output_stride=output_stride)
    if any(stride == 1 for stride in strides[1:]):
        output_stride = 4 * math.prod(strides)
        if output_stride not in (8, 16, 32):
            raise _strides_error(strides, dilations)
    else:
        output_stride = None
    return dict(downsample_in_first_stage=strides[0] == 2, output_stride=output_stride)


def _check_strides(trunk: ResNetTrunk, strides: Sequence[int], dilations: Sequence[int]) -> None:
    """Refuse ``strides``/``dilations`` that the trunk's stride-for-dilation rule did not reproduce."""
    expected = [(4 * math.prod(strides[: index + 1]), dilations[index]) for index in range(len(strides))]
    if [(spec.stride, spec.dilation) for spec in trunk.stage_specs[1:]] != expected:
        raise _strides_error(strides, dilations)


def _strides_error(strides: Sequence[int], dilations: Sequence[int]) -> ValueError:
    return ValueError(
        f"strides={tuple(strides)} with dilations={tuple(dilations)} cannot be built: RBResNet trades stride for "
        "dilation as mmdet's and mmseg's dilated configs do, where each stage after the first that has stride 1 "
        "doubles the dilation, and every later stage has stride 1 too: e.g. strides=(1, 2, 1, 1) with "
        "dilations=(1, 1, 2, 4) (output stride 8), or strides=(1, 2, 2, 1) with dilations=(1, 1, 1, 2) (16)."
    )


def _pretrained_init_cfg(pretrained: str | None, init_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``init_cfg`` as :meth:`RBResNet.init_weights` reads it (mmdet's deprecated ``pretrained`` included)."""
    if pretrained is not None and init_cfg is not None:
        raise ValueError("Give init_cfg or pretrained, not both (pretrained=x means init_cfg=Pretrained(x)).")
    if pretrained is not None:
        return dict(type="Pretrained", checkpoint=pretrained)
    if init_cfg is None:
        return None
    init_cfg = dict(init_cfg)
    if init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg:
        raise ValueError(
            "init_cfg must be None or dict(type='Pretrained', checkpoint=..., prefix=...): RBResNet initialises "
            f"itself as mmdet's ResNet does (Kaiming convs, unit norms, zero_init_residual); got {init_cfg!r}."
        )
    return init_cfg


def _read_checkpoint(checkpoint: str | os.PathLike) -> Mapping[str, Tensor]:
    """A URL (``torchvision://resnet50``, ``open-mmlab://...``, ``https://...``) through mmengine's loader and
    cache, as mmdet reads it; a file through the weights package's safe reader; a folder or Hub repo id through
    ``from_pretrained`` (which refuses a preset: it has no weights)."""
    source = resolve_source(checkpoint)
    if source.kind == "url":
        from mmengine.runner.checkpoint import CheckpointLoader  # mmengine's runner takes seconds to import

        return CheckpointLoader.load_checkpoint(source.value, map_location="cpu")
    if source.kind == "file":
        return read_state_dict(source.path)
    return ResNetTrunk.from_pretrained(source).state_dict()


def _under_prefix(checkpoint: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix`` (mmengine's ``Pretrained`` ``prefix``: e.g. a detector's ``backbone.``)."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    selected = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not selected:
        raise ValueError(
            f"No checkpoint key starts with init_cfg's prefix {prefix!r}; the keys begin {list(state_dict)[:5]}."
        )
    return selected


# ---------------------------------------------------------------- mmdet's names


class _MmdetNames(dict):
    """The ``_modules`` of a module that shows the trunk's convs and norms under mmdet's names.

    A child set here (mmengine's SyncBN conversion and reversion, mmcv's conv-bn fusion) is set where the trunk
    holds it as well, so the network that runs is the one that is named; a group (``layer1``, ``layer1.0``) only
    names, and cannot be replaced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[str, tuple[nn.Module, str]] = {}

    def link(self, name: str, owner: nn.Module, attribute: str) -> None:
        """Show ``owner``'s child ``attribute`` as ``name``."""
        self.owners[name] = owner, attribute
        super().__setitem__(name, owner._modules[attribute])

    def __setitem__(self, name: str, module: nn.Module | None) -> None:
        owners = self.__dict__.get("owners", {})  # empty while unpickling, which sets the items first
        if name in owners:
            owner, attribute = owners[name]
            owner._modules[attribute] = module
        elif name in self and self[name] is not module:
            raise TypeError(
                f"{name!r} groups modules of RBResNet's network as mmdet names them and cannot be replaced; replace "
                "the convs and norms inside it instead."
            )
        super().__setitem__(name, module)

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"{name!r} is part of RBResNet's network and cannot be deleted.")


class _MmdetGroup(nn.Module):
    """A group of the trunk's modules under mmdet's name (``stem``, ``layer1``, ``layer1.0``, ``downsample``).

    It only names: the trunk runs the network, so calling a group, or hooking it (the hook would never fire), is
    refused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_modules"] = _MmdetNames()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "RBResNet's groups (stem, layerN, layerN.M, downsample) name mmdet's modules but do not run: call "
            "RBResNet itself, and hook a conv or norm inside a group, or RBResNet."
        )

    register_forward_hook = register_forward_pre_hook = forward
    register_full_backward_hook = register_full_backward_pre_hook = forward


def _name_as_mmdet(module: nn.Module, trunk: ResNetTrunk, layout: PeerLayout) -> None:
    """Make ``module``'s children mmdet's ``ResNet``'s: the trunk's convs and norms under the names of mmdet's
    checkpoints (the weights package's mmdet layout), so parameter names, ``named_modules`` and the state dict
    all speak mmdet's names, in mmdet's order."""
    canonical_keys = list(trunk.state_dict())
    mmdet_keys = from_canonical(dict.fromkeys(canonical_keys), layout)
    paths = dict(zip((k.rpartition(".")[0] for k in mmdet_keys), (k.rpartition(".")[0] for k in canonical_keys)))
    module.__dict__["_modules"] = _MmdetNames()
    for mmdet_path in _mmdet_order(list(paths)):
        *groups, name = mmdet_path.split(".")
        parent = module
        for group in groups:
            if group not in parent._modules:
                parent._modules[group] = _MmdetGroup()
            parent = parent._modules[group]
        owner_path, _, attribute = paths[mmdet_path].rpartition(".")
        parent._modules.link(name, trunk.get_submodule(owner_path), attribute)


def _mmdet_order(paths: list[str]) -> list[str]:
    """``paths`` (mmdet's, in the trunk's order) in mmdet's order: its blocks register the shortcut
    (``downsample``) after the main branch, ours (transformers') before. Optimizer state is stored by parameter
    position, so the same order keeps it interchangeable with mmdet's ``ResNet``."""

    def block(path: str) -> str:
        return path.partition(".downsample.")[0] if ".downsample." in path else path.rpartition(".")[0]

    first_seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        first_seen.setdefault(block(path), index)
    return sorted(paths, key=lambda path: (first_seen[block(path)], ".downsample." in path))


# ---------------------------------------------------------------- registration


def _register() -> None:
    """``RBResNet`` in mmengine's root ``MODELS`` and in mmdet's and mmseg's when installed; importing this
    module again (or reloading it) replaces the entry instead of failing."""
    MODELS.register_module(name="RBResNet", module=RBResNet, force=True)
    for framework in ("mmdet", "mmseg"):
        if importlib.util.find_spec(framework) is not None:
            registry = importlib.import_module(f"{framework}.registry").MODELS
            registry.register_module(name="RBResNet", module=RBResNet, force=True)


_register()
