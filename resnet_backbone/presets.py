"""Named architectures: each preset is data (config overrides), shaped as torchvision and timm define it."""

from __future__ import annotations

from typing import Any

from .hints import close_match_hint

_BASIC = dict(layer_type="basic", hidden_sizes=[64, 128, 256, 512])
_BOTTLENECK = dict(layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048])
_DEPTHS_34_50 = [3, 4, 6, 3]
_DEPTHS_101 = [3, 4, 23, 3]
_RESNET_D = dict(stem_type="deep", avg_down=True)

PRESETS: dict[str, dict[str, Any]] = {
    "resnet18": dict(_BASIC, depths=[2, 2, 2, 2]),
    "resnet34": dict(_BASIC, depths=_DEPTHS_34_50),
    "resnet50": dict(_BOTTLENECK, depths=_DEPTHS_34_50),
    "resnet101": dict(_BOTTLENECK, depths=_DEPTHS_101),
    "resnet152": dict(_BOTTLENECK, depths=[3, 8, 36, 3]),
    "resnext50_32x4d": dict(_BOTTLENECK, depths=_DEPTHS_34_50, groups=32, width_per_group=4),
    "resnext101_32x8d": dict(_BOTTLENECK, depths=_DEPTHS_101, groups=32, width_per_group=8),
    "resnext101_64x4d": dict(_BOTTLENECK, depths=_DEPTHS_101, groups=64, width_per_group=4),
    "wide_resnet50_2": dict(_BOTTLENECK, depths=_DEPTHS_34_50, width_per_group=128),
    "wide_resnet101_2": dict(_BOTTLENECK, depths=_DEPTHS_101, width_per_group=128),
    "resnet50d": dict(_BOTTLENECK, depths=_DEPTHS_34_50, **_RESNET_D),
    "resnet101d": dict(_BOTTLENECK, depths=_DEPTHS_101, **_RESNET_D),
}


def preset_overrides(name: str) -> dict[str, Any]:
    """Return a fresh copy of the config fields that define preset ``name``."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset {name!r}.{close_match_hint(name, PRESETS)} Valid presets: {', '.join(PRESETS)}."
        )
    return {key: list(value) if isinstance(value, list) else value for key, value in PRESETS[name].items()}
