"""detectron2 adapter: this backbone in detectron2's configs, LazyConfigs and checkpoints.

Importing this module registers three builders in detectron2's ``BACKBONE_REGISTRY``, so a config changes one
line (``MODEL.BACKBONE.NAME: "build_rb_resnet_fpn_backbone"``):

- ``build_rb_resnet_backbone``: the ResNet alone, as detectron2's ``build_resnet_backbone`` (C4, DC5 models);
- ``build_rb_resnet_fpn_backbone``: detectron2's ``FPN`` on it with ``LastLevelMaxPool`` (Faster/Mask R-CNN);
- ``build_rb_retinanet_resnet_fpn_backbone``: the ``FPN`` with ``LastLevelP6P7`` (RetinaNet).

They read ``MODEL.RESNETS`` and ``MODEL.BACKBONE.FREEZE_AT`` with detectron2's meaning, and
``MODEL.RB_RESNET`` (:func:`add_rb_resnet_config`) for what those keys cannot say. In a LazyConfig,
``L(RBResNet)(depth=50, out_features=["res2", "res3", "res4", "res5"], ...)`` is the FPN's ``bottom_up``.

The network is this project's trunk, with its stage loop; its state dict speaks detectron2's ``ResNet`` keys
(the weights package's detectron2 layout), so checkpoints of models built with detectron2's own ResNet load
strictly through ``DetectionCheckpointer``, and its conversion of model-zoo ``.pkl`` files keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import Tensor, nn

from resnet_backbone import PRESETS, ResNetBackbone, ResNetConfig, ResNetTrunk, close_match_hint
from resnet_backbone.weights import PeerLayout, from_canonical, load_checkpoint, read_state_dict, to_canonical

__all__ = [
    "RBResNet",
    "add_rb_resnet_config",
    "build_rb_resnet_backbone",
    "build_rb_resnet_fpn_backbone",
    "build_rb_retinanet_resnet_fpn_backbone",
    "rb_resnet_arguments",
]

DEPTHS = (18, 34, 50, 101, 152)
# detectron2's NORM names -> the core's norm_layer (detectron2's "GN" has 32 groups, as the core's).
NORM_LAYERS = {
    "FrozenBN": "frozen_batch",
    "BN": "batch",
    "SyncBN": "sync_batch",
    "nnSyncBN": "sync_batch",
    "GN": "group",
}
# The other names detectron2's get_norm takes, and why RBResNet does not build them.
_REFUSED_NORMS = {
    "": "no norm at all",
    "naiveSyncBN": "detectron2's NaiveSyncBatchNorm (use SyncBN)",
    "naiveSyncBN_N": "detectron2's NaiveSyncBatchNorm with stats_mode='N' (use SyncBN)",
    "LN": "LayerNorm over channels",
}
# MODEL.RESNETS keys -> RBResNet's arguments; the DEFORM_* keys are checked instead (any deformable stage refused).
_RESNETS_KEYS = {
    "DEPTH": "depth",
    "OUT_FEATURES": "out_features",
    "NORM": "norm",
    "NUM_GROUPS": "num_groups",
    "WIDTH_PER_GROUP": "width_per_group",
    "STRIDE_IN_1X1": "stride_in_1x1",
    "STEM_OUT_CHANNELS": "stem_out_channels",
    "RES2_OUT_CHANNELS": "res2_out_channels",
    "RES5_DILATION": "res5_dilation",
}
_DEFORM_KEYS = ("DEFORM_ON_PER_STAGE", "DEFORM_MODULATED", "DEFORM_NUM_GROUPS")
_RB_RESNET_KEYS = {"PRESET": "preset", "OUTPUT_STRIDE": "output_stride", "WEIGHTS": "weights"}
_LAYOUT = PeerLayout(naming="detectron2")
_ARCHITECTURE_DEFAULTS = dict(depth=50, num_groups=1, width_per_group=64, stem_out_channels=64, res2_out_channels=256)


class RBResNet(Backbone):
    """detectron2's ``ResNet`` (as ``build_resnet_backbone`` builds it) on this project's trunk.

    Arguments are ``MODEL.RESNETS``' keys in lower case, with their meaning, and the defaults of detectron2's
    ``ResNet`` class (``norm="BN"``, ``stride_in_1x1=False``, ``freeze_at=0``, ``out_features=None``: the last
    stage; detectron2's yaml defaults are ``FrozenBN``, ``True``, ``2``, ``["res4"]``). ``stride_in_1x1``
    puts a block's stride in its first 1x1 convolution, as detectron2's MSRA weights need. ``freeze_at`` counts
    as detectron2: 1 freezes the stem, k the stem and res2..res(k), converting their BatchNorms to detectron2's
    ``FrozenBatchNorm2d``. ``out_features`` are ``stem`` and ``res2``..``res5``; stages after the deepest are
    not built.

    Beyond detectron2: ``preset`` (one of this project's presets, instead of ``depth`` and the width keys),
    ``output_stride`` (8, 16 or 32, instead of ``res5_dilation``) and ``weights`` (anything
    ``ResNetBackbone.from_pretrained`` takes, loaded strictly; its report is in ``load_report``).

    Args:
        depth: 18, 34, 50, 101 or 152 (``MODEL.RESNETS.DEPTH``).
        out_features: the outputs, among ``stem`` and ``res2``..``res5`` (default: the last stage).
        norm: ``FrozenBN``, ``BN``, ``SyncBN``, ``nnSyncBN`` or ``GN``.
        num_groups: groups of the bottleneck's 3x3 convolution (ResNeXt).
        width_per_group: channels per group of that convolution.
        stride_in_1x1: the block's stride in its first 1x1 convolution (detectron2's MSRA weights).
        stem_out_channels: the stem's output channels.
        res2_out_channels: res2's output channels (the others double).
        res5_dilation: 1, or 2 for a dilated res5 (stride 16).
        freeze_at: 0 (nothing frozen) to 5, as detectron2 counts.
        in_channels: the input's channels.
        preset: one of this project's presets, instead of ``depth`` and the width keys.
        output_stride: 8, 16 or 32, instead of ``res5_dilation``.
        weights: a checkpoint to load strictly, anything ``ResNetBackbone.from_pretrained`` takes.

    Raises:
        ValueError: a value detectron2's ResNet does not take, or that this backbone cannot reproduce.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        out_features: Sequence[str] | None = None,
        norm: str = "BN",
        num_groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        res5_dilation: int = 1,
        freeze_at: int = 0,
        in_channels: int = 3,
        preset: str | None = None,
        output_stride: int | None = None,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        names = _check_out_features(out_features)
        architecture = dict(
            depth=depth,
            num_groups=num_groups,
            width_per_group=width_per_group,
            stem_out_channels=stem_out_channels,
            res2_out_channels=res2_out_channels,
        )
        norm_layer = _norm_layer(norm)
        # FrozenBN: detectron2's FrozenBatchNorm2d (its arithmetic and keys), converted from BatchNorm as it converts.
        frozen_norms = norm_layer == "frozen_batch"
        config = _architecture(preset, **architecture).with_overrides(
            num_channels=in_channels,
            norm_layer="batch" if frozen_norms else norm_layer,
            **_dilation_fields(res5_dilation, output_stride),
            out_features=[_OUR_NAMES[name] for name in names],
        )
        if config.layer_type == "bottleneck":
            config = config.with_overrides(downsample_in_bottleneck=bool(stride_in_1x1))
        self._out_features = list(names)
        self.trunk = ResNetBackbone(config)
        self.load_report = None if weights is None else load_checkpoint(self.trunk, _read_weights(weights))
        if frozen_norms:
            _convert_to_frozen_norms(self.trunk)
        self.freeze(freeze_at)
        self.register_state_dict_post_hook(_to_detectron2_keys)
        self.register_load_state_dict_pre_hook(_from_detectron2_keys)
        self.register_load_state_dict_post_hook(_report_detectron2_keys)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The ``out_features`` maps by name, in stage order, from the trunk's stage loop."""
        selected = {}
        for output in self.trunk.iter_stages(x):
            name = _DETECTRON2_NAMES[output.name]
            if name in self._out_features:
                selected[name] = output.hidden_state
        return selected

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of each ``out_features`` map, from the stage specs."""
        specs = {_DETECTRON2_NAMES[spec.name]: spec for spec in self.trunk.stage_specs}
        return {
            name: ShapeSpec(channels=specs[name].channels, stride=specs[name].stride) for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        """The stride of the deepest stage built: inputs divisible by it keep every map an exact fraction."""
        return self.trunk.size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.size_divisibility}

    def freeze(self, freeze_at: int = 0) -> RBResNet:
        """Freeze the stem (``freeze_at`` >= 1) and res2..res(``freeze_at``), as detectron2's ``ResNet.freeze``:
        no gradients, BatchNorm and SyncBatchNorm converted to detectron2's ``FrozenBatchNorm2d``.

        Args:
            freeze_at: 0 (nothing) to 5; never less than the config's own ``freeze_at``.

        Returns:
            This backbone.

        Raises:
            ValueError: ``freeze_at`` out of range.
        """
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= len(_DETECTRON2_NAMES):
            raise ValueError(
                f"FREEZE_AT (freeze_at) must be 0 (nothing frozen) to {len(_DETECTRON2_NAMES)}: 1 freezes the stem, "
                f"k the stem and res2..res(k), as detectron2 counts; got {freeze_at!r}."
            )
        self.trunk.freeze(max(freeze_at, self.trunk.config.freeze_at))
        for module in self.trunk.frozen_modules():
            FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        return self


def _convert_to_frozen_norms(trunk: ResNetBackbone) -> None:
    """Every BatchNorm to detectron2's ``FrozenBatchNorm2d`` as its ``NORM="FrozenBN"`` builds them: without the
    ``num_batches_tracked`` that its conversion (of frozen stages) carries over."""
    FrozenBatchNorm2d.convert_frozen_batchnorm(trunk)
    for module in trunk.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.num_batches_tracked = None
    trunk.config = trunk.config.with_overrides(norm_layer="frozen_batch")


def _check_out_features(out_features: Sequence[str] | None) -> list[str]:
    if out_features is None:
        return ["res5"]  # detectron2's ResNet returns its last stage
    choices = list(_OUR_NAMES)
    unknown = [name for name in out_features if name not in choices] if not isinstance(out_features, str) else []
    if isinstance(out_features, str) or not out_features or unknown:
        hint = close_match_hint(unknown[0], choices) if unknown else ""
        raise ValueError(
            f"OUT_FEATURES (out_features) must be a non-empty list of {', '.join(choices)}, got {out_features!r}.{hint}"
            + (" RBResNet has no classifier ('linear')." if "linear" in unknown else "")
        )
    return list(out_features)


def _architecture(preset: str | None, **architecture: int) -> ResNetConfig:
    """The config of detectron2's ``DEPTH``, ``NUM_GROUPS``, ``WIDTH_PER_GROUP``, ``STEM_OUT_CHANNELS`` and
    ``RES2_OUT_CHANNELS``, or of a preset (those keys then at their defaults)."""
    if preset is not None:
        changed = {name: value for name, value in architecture.items() if value != _ARCHITECTURE_DEFAULTS[name]}
        if changed:
            defaults = ", ".join(f"{key.upper()}={_ARCHITECTURE_DEFAULTS[key]}" for key in changed)
            raise ValueError(
                f"PRESET {preset!r} sets the architecture: leave {', '.join(key.upper() for key in changed)} at "
                f"detectron2's defaults ({defaults}), or drop PRESET."
            )
        if preset not in PRESETS:
            raise ValueError(
                f"PRESET must be one of {', '.join(PRESETS)}, got {preset!r}.{close_match_hint(preset, PRESETS)}"
            )
        return ResNetConfig.from_preset(preset)
    depth, groups, width = architecture["depth"], architecture["num_groups"], architecture["width_per_group"]
    stem_channels, res2_channels = architecture["stem_out_channels"], architecture["res2_out_channels"]
    if depth not in DEPTHS:
        raise ValueError(f"DEPTH must be one of {', '.join(map(str, DEPTHS))} (as detectron2's), got {depth!r}.")
    config = ResNetConfig.from_preset(f"resnet{depth}", embedding_size=stem_channels)
    if config.layer_type == "basic":
        if (res2_channels, groups) != (64, 1):
            raise ValueError(
                f"DEPTH {depth} (basic blocks) needs RES2_OUT_CHANNELS=64 and NUM_GROUPS=1, as detectron2 asserts; got "
                f"RES2_OUT_CHANNELS={res2_channels}, NUM_GROUPS={groups}."
            )
        return config
    # detectron2's res2 bottleneck is NUM_GROUPS * WIDTH_PER_GROUP wide; the core's res2 / 4 * width / 64 * groups.
    core_width = width * 256 / res2_channels
    if core_width != int(core_width):
        raise ValueError(
            f"WIDTH_PER_GROUP={width} with RES2_OUT_CHANNELS={res2_channels} gives a bottleneck width that this "
            "backbone cannot build; use a RES2_OUT_CHANNELS that divides WIDTH_PER_GROUP * 256."
        )
    return config.with_overrides(
        hidden_sizes=[res2_channels * 2**index for index in range(4)], groups=groups, width_per_group=int(core_width)
    )


def _norm_layer(norm: str) -> str:
    if norm in NORM_LAYERS:
        return NORM_LAYERS[norm]
    reason = f" ({_REFUSED_NORMS[norm]} is not built by RBResNet)" if norm in _REFUSED_NORMS else ""
    raise ValueError(
        f"NORM (norm) must be one of {', '.join(NORM_LAYERS)}, got {norm!r}{reason}."
        f"{close_match_hint(str(norm), NORM_LAYERS)}"
    )


def _dilation_fields(res5_dilation: int, output_stride: int | None) -> dict[str, Any]:
    """detectron2's ``RES5_DILATION`` (2: res5 keeps stride 16 and dilates all its blocks), or ours."""
    if res5_dilation not in (1, 2):
        raise ValueError(f"RES5_DILATION must be 1 or 2 (as detectron2's), got {res5_dilation!r}.")
    if output_stride is not None and res5_dilation != 1:
        raise ValueError(
            f"Give RES5_DILATION or RB_RESNET.OUTPUT_STRIDE, not both: got RES5_DILATION={res5_dilation}, "
            f"OUTPUT_STRIDE={output_stride} (RES5_DILATION=2 is OUTPUT_STRIDE=16)."
        )
    return dict(output_stride=16 if res5_dilation == 2 else output_stride, dilation_rule="mmdet")


def _read_weights(weights: str | os.PathLike) -> dict[str, Tensor]:
    """A file through the weights package's safe reader; a folder or Hub id through ``from_pretrained``."""
    if os.path.isfile(weights):
        return read_state_dict(weights)
    return ResNetTrunk.from_pretrained(weights).state_dict()


# ---------------------------------------------------------------- detectron2's names

# The stage specs' names -> detectron2's ("stem", then "res2".."res5"), and back.
_DETECTRON2_NAMES = {"stem": "stem", **{f"stage{index}": f"res{index + 1}" for index in range(1, 5)}}
_OUR_NAMES = {name: ours for ours, name in _DETECTRON2_NAMES.items()}
_TRUNK = "trunk."


def _to_detectron2_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: the trunk's keys (``trunk.embedder...``) become detectron2's (``stem.conv1...``)."""
    trunk_keys = [key for key in state_dict if key.startswith(prefix + _TRUNK)]
    canonical = {key[len(prefix + _TRUNK) :]: state_dict.pop(key) for key in trunk_keys}
    for key, value in from_canonical(canonical, _LAYOUT).items():
        state_dict[prefix + key] = value


def _from_detectron2_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre hook: detectron2's keys become the trunk's; keys that are not detectron2's ResNet's
    stay as they are, so that the load reports them as unexpected."""
    keys = [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + _TRUNK)]
    if not keys:
        return
    detectron2 = {key[len(prefix) :]: state_dict.pop(key) for key in keys}
    canonical, _ = to_canonical(detectron2, _LAYOUT)
    for (key, value), ours in zip(detectron2.items(), canonical, strict=True):
        state_dict[prefix + (key if ours == key else _TRUNK + ours)] = value


def _report_detectron2_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post hook: missing keys of the trunk are reported under detectron2's names."""
    for index, key in enumerate(incompatible_keys.missing_keys):
        head, separator, tail = key.partition(_TRUNK)
        if separator and (head == "" or head.endswith(".")):
            incompatible_keys.missing_keys[index] = head + next(iter(from_canonical({tail: None}, _LAYOUT)))


# ---------------------------------------------------------------- configs and builders


def add_rb_resnet_config(cfg: CfgNode) -> None:
    """Add ``MODEL.RB_RESNET``: ``PRESET`` (one of this project's presets, instead of ``DEPTH`` and the width
    keys), ``OUTPUT_STRIDE`` (8, 16 or 32, instead of ``RES5_DILATION``) and ``WEIGHTS`` (anything
    ``ResNetBackbone.from_pretrained`` takes). All ``None``: detectron2's keys alone decide.

    Args:
        cfg: the detectron2 config, changed in place (call it before ``merge_from_file``).
    """
    cfg.MODEL.RB_RESNET = CfgNode({key: None for key in _RB_RESNET_KEYS})


def rb_resnet_arguments(cfg: CfgNode, input_shape: ShapeSpec) -> dict[str, Any]:
    """:class:`RBResNet`'s arguments for a detectron2 config; any key whose meaning RBResNet does not reproduce
    (a deformable stage, a key detectron2's ResNet does not have) is an error, never ignored.

    Args:
        cfg: the detectron2 config (``MODEL.RESNETS``, ``MODEL.BACKBONE.FREEZE_AT``, ``MODEL.RB_RESNET``).
        input_shape: the input's ``ShapeSpec`` (its channels).

    Returns:
        The keyword arguments of :class:`RBResNet`.

    Raises:
        ValueError: a key or value RBResNet cannot reproduce.
    """
    resnets = cfg.MODEL.RESNETS
    unknown = sorted(set(resnets) - set(_RESNETS_KEYS) - set(_DEFORM_KEYS))
    if unknown:
        raise ValueError(
            f"MODEL.RESNETS has keys that detectron2's build_resnet_backbone does not read, and RBResNet cannot "
            f"reproduce: {unknown}. Remove them, or use the backbone that defines them."
        )
    if any(resnets.get("DEFORM_ON_PER_STAGE", ())):
        raise ValueError(
            f"RBResNet has no deformable convolutions: MODEL.RESNETS.DEFORM_ON_PER_STAGE must be all False, got "
            f"{list(resnets.DEFORM_ON_PER_STAGE)}. Use detectron2's build_resnet_backbone for DCN configs."
        )
    arguments = {name: resnets[key] for key, name in _RESNETS_KEYS.items()}
    arguments.update(freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, in_channels=input_shape.channels)
    ours = cfg.MODEL.get("RB_RESNET", {})
    unknown = sorted(set(ours) - set(_RB_RESNET_KEYS))
    if unknown:
        raise ValueError(f"MODEL.RB_RESNET has unknown keys {unknown}; it takes {', '.join(_RB_RESNET_KEYS)}.")
    arguments.update({name: ours[key] for key, name in _RB_RESNET_KEYS.items() if ours.get(key) not in (None, "")})
    return arguments


@BACKBONE_REGISTRY.register()
def build_rb_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> RBResNet:
    """detectron2's ``build_resnet_backbone``, on this project's trunk.

    Args:
        cfg: the detectron2 config.
        input_shape: the input's ``ShapeSpec``.

    Returns:
        The :class:`RBResNet` the config describes.
    """
    return RBResNet(**rb_resnet_arguments(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_rb_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``build_resnet_fpn_backbone`` (``FPN`` with ``LastLevelMaxPool``) on :class:`RBResNet`.

    Args:
        cfg: the detectron2 config (``MODEL.FPN`` too).
        input_shape: the input's ``ShapeSpec``.

    Returns:
        detectron2's ``FPN`` over the :class:`RBResNet` the config describes.
    """
    return _fpn(cfg, build_rb_resnet_backbone(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_rb_retinanet_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``build_retinanet_resnet_fpn_backbone`` (``FPN`` with ``LastLevelP6P7`` from res5).

    Args:
        cfg: the detectron2 config (``MODEL.FPN`` too).
        input_shape: the input's ``ShapeSpec``.

    Returns:
        detectron2's ``FPN`` with P6 and P7 over the :class:`RBResNet` the config describes.
    """
    bottom_up = build_rb_resnet_backbone(cfg, input_shape)
    top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS)
    return _fpn(cfg, bottom_up, top_block)


def _fpn(cfg: CfgNode, bottom_up: RBResNet, top_block: nn.Module) -> FPN:
    fpn = cfg.MODEL.FPN
    return FPN(
        bottom_up=bottom_up,
        in_features=fpn.IN_FEATURES,
        out_channels=fpn.OUT_CHANNELS,
        norm=fpn.NORM,
        top_block=top_block,
        fuse_type=fpn.FUSE_TYPE,
    )
