"""State-dict layouts: transformers' (this project's own) and torchvision's / timm's / mmdet's / detectron2's, as
one key table.

Keys are translated module path by module path (the parameter name after the last dot never changes).
The tables below are the whole mapping, used in both directions. Placeholders: ``{stage}``, ``{block}``
and ``{conv}`` count from 0; ``{stage1}`` and ``{conv1}`` are the same numbers counted from 1 (``{stage2}``
from 2); ``{norm}`` is the layout's norm name (``bn``, or ``gn`` for mmdet's GroupNorm layers).

mmdet's and mmseg's ResNet keys are torchvision's, except their deep stem (``stem.N``) and that they name
GroupNorm layers ``gn1``, ``gn2``, ... (mmcv's ``build_norm_layer``). detectron2's ResNet names its stages
``res2``..``res5`` and nests each norm in its convolution (``res2.0.conv1.norm``); it has no deep stem and no
average-pool shortcut.

The canonical form used internally is transformers' ``ResNetModel`` layout plus ``classifier.1.*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

# Prefixes that wrappers add (DataParallel, detection frameworks, transformers' classifier).
KNOWN_PREFIXES = ("module.", "backbone.body.", "backbone.bottom_up.", "backbone.", "model.", "resnet.")
# Checkpoint files often nest the state dict under one of these keys.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")

_BLOCK = "encoder.stages.{stage}.layers.{block}"
_PEER_BLOCK = "layer{stage1}.{block}"
_DEFAULT_STEM = [("embedder.embedder.convolution", "conv1"), ("embedder.embedder.normalization", "{norm}1")]
_STEM_RULES = {
    ("torchvision", "default"): _DEFAULT_STEM,
    ("mmdet", "default"): _DEFAULT_STEM,
    # timm's deep stem is one Sequential (conv, bn, act, conv, bn, act, conv); its last norm is bn1.
    ("torchvision", "deep"): [
        ("embedder.embedder.0.convolution", "conv1.0"),
        ("embedder.embedder.0.normalization", "conv1.1"),
        ("embedder.embedder.1.convolution", "conv1.3"),
        ("embedder.embedder.1.normalization", "conv1.4"),
        ("embedder.embedder.2.convolution", "conv1.6"),
        ("embedder.embedder.2.normalization", "bn1"),
    ],
    # mmdet's (conv, norm, act) x 3 in one Sequential.
    ("mmdet", "deep"): [
        (f"embedder.embedder.{index}.{part}", f"stem.{3 * index + offset}")
        for index in range(3)
        for part, offset in (("convolution", 0), ("normalization", 1))
    ],
}
_BLOCK_RULES = [
    (f"{_BLOCK}.layer.{{conv}}.convolution", f"{_PEER_BLOCK}.conv{{conv1}}"),
    (f"{_BLOCK}.layer.{{conv}}.normalization", f"{_PEER_BLOCK}.{{norm}}{{conv1}}"),
]
# With avg_down, timm's downsample.0 is the average pool, so the conv and norm move up by one.
_SHORTCUT_RULES = {
    avg_down: [
        (f"{_BLOCK}.shortcut.convolution", f"{_PEER_BLOCK}.downsample.{int(avg_down)}"),
        (f"{_BLOCK}.shortcut.normalization", f"{_PEER_BLOCK}.downsample.{int(avg_down) + 1}"),
    ]
    for avg_down in (False, True)
}
_CLASSIFIER_RULES = [("classifier.1", "fc")]
_DETECTRON2_BLOCK = "res{stage2}.{block}"
_DETECTRON2_RULES = [
    ("embedder.embedder.convolution", "stem.conv1"),
    ("embedder.embedder.normalization", "stem.conv1.norm"),
    (f"{_BLOCK}.layer.{{conv}}.convolution", f"{_DETECTRON2_BLOCK}.conv{{conv1}}"),
    (f"{_BLOCK}.layer.{{conv}}.normalization", f"{_DETECTRON2_BLOCK}.conv{{conv1}}.norm"),
    (f"{_BLOCK}.shortcut.convolution", f"{_DETECTRON2_BLOCK}.shortcut"),
    (f"{_BLOCK}.shortcut.normalization", f"{_DETECTRON2_BLOCK}.shortcut.norm"),
    ("classifier.1", "linear"),  # detectron2's ResNet(num_classes=...)
]
_PLACEHOLDER = re.compile(r"([a-z]+)(\d?)")


NAMINGS = ("torchvision", "mmdet", "detectron2")


@dataclass(frozen=True)
class PeerLayout:
    """Which torchvision/timm/mmdet/detectron2 key variant a checkpoint uses; torchvision's is the default one.

    Attributes:
        stem_type: as ``ResNetConfig``'s (timm's ResNet-D keys differ in the stem).
        avg_down: as ``ResNetConfig``'s (and in the shortcuts).
        naming: ``"torchvision"`` (torchvision's and timm's names), ``"mmdet"`` (mmdet's and mmseg's) or
            ``"detectron2"`` (only with the default stem and no ``avg_down``).
        norm_name: what the norm layers are called before their number (``"gn"`` for mmdet's GroupNorm).
    """

    stem_type: str = "default"
    avg_down: bool = False
    naming: str = "torchvision"
    norm_name: str = "bn"


def peer_rules(layout: PeerLayout) -> list[tuple[str, str]]:
    """(canonical module path, torchvision/timm/mmdet/detectron2 module path) templates for a layout."""
    if layout.naming == "detectron2":
        if layout.stem_type != "default" or layout.avg_down:
            raise ValueError(
                "detectron2's ResNet has neither a deep stem nor average-pool shortcuts (ResNet-C/D): got "
                f"stem_type={layout.stem_type!r}, avg_down={layout.avg_down}."
            )
        return list(_DETECTRON2_RULES)
    rules = [
        *_STEM_RULES[layout.naming, layout.stem_type],
        *_BLOCK_RULES,
        *_SHORTCUT_RULES[layout.avg_down],
        *_CLASSIFIER_RULES,
    ]
    return [(ours, peer.replace("{norm}", layout.norm_name)) for ours, peer in rules]


def extract_state_dict(loaded: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, unwrapping ``{"state_dict": ...}``-style containers."""
    while isinstance(loaded, Mapping) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        inner = next((loaded[key] for key in CONTAINER_KEYS if isinstance(loaded.get(key), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"{source} holds no state dict: expected tensors, or one of {list(CONTAINER_KEYS)} holding them; "
                f"found keys {list(loaded)[:8]}."
            )
        loaded = inner
    if not isinstance(loaded, Mapping) or not loaded:
        found = f"an empty {type(loaded).__name__}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(f"{source} holds no tensors: expected a mapping of names to tensors, got {found}.")
    return dict(loaded)


def strip_known_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same mapping with wrapper prefixes dropped from every key."""
    return {strip_prefixes(key): value for key, value in state_dict.items()}


def strip_prefixes(key: str) -> str:
    """``key`` without any leading wrapper prefixes (``module.backbone.body.conv1.weight`` -> ``conv1.weight``)."""
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def detect_layout(keys: list[str]) -> PeerLayout | None:
    """``None`` for transformers' layout, else the torchvision/timm/mmdet/detectron2 variant; unknown keys are an
    error."""
    if any(key.startswith(("embedder.", "encoder.")) for key in keys):
        return None
    if any(key.startswith(("stem.conv1.", "res2.")) for key in keys):
        return PeerLayout(naming="detectron2")
    if any(key.startswith(("conv1.", "layer1.", "stem.")) for key in keys):
        mmdet_stem = "stem.0.weight" in keys
        group_norm = any(re.match(r"(layer\d+\.\d+\.)?gn1\.", key) for key in keys)
        return PeerLayout(
            stem_type="deep" if mmdet_stem or "conv1.0.weight" in keys else "default",
            avg_down=any(re.match(r"layer\d+\.\d+\.downsample\.2\.", key) for key in keys),
            naming="mmdet" if mmdet_stem or group_norm else "torchvision",
            norm_name="gn" if group_norm else "bn",
        )
    sample = ", ".join(keys[:5])
    raise ValueError(
        "Unrecognised checkpoint layout: expected transformers keys (embedder.*, encoder.*), torchvision/timm/"
        f"mmdet keys (conv1.*, stem.*, layer1.*) or detectron2 keys (stem.conv1.*, res2.*), got {len(keys)} keys "
        f"starting with: {sample or '(none)'}."
    )


def to_canonical(
    state_dict: Mapping[str, torch.Tensor], layout: PeerLayout | None = None
) -> tuple[dict[str, torch.Tensor], PeerLayout | None]:
    """Any supported layout -> canonical keys, and the peer layout it came from (``None``: transformers).

    Args:
        state_dict: the tensors, under any wrapper prefix, possibly in a ``{"state_dict": ...}``-style container.
        layout: the peer layout the keys are known to be in (default: read off the keys); keys that no rule of
            it matches come back unchanged.

    Returns:
        (the state dict under canonical keys, the layout it came from; ``None`` for transformers').

    Raises:
        ValueError: a container that holds no state dict.
    """
    state_dict = strip_known_prefixes(extract_state_dict(state_dict, source="The checkpoint"))
    layout = detect_layout(list(state_dict)) if layout is None else layout
    if layout is None:
        return state_dict, None
    rules = [(peer, ours) for ours, peer in peer_rules(layout)]
    return {translate_key(key, rules): value for key, value in state_dict.items()}, layout


def from_canonical(state_dict: Mapping[str, torch.Tensor], layout: PeerLayout) -> dict[str, torch.Tensor]:
    """Canonical keys -> torchvision/timm/mmdet/detectron2 keys of ``layout``; every key must translate.

    Args:
        state_dict: tensors under canonical (transformers') keys.
        layout: the peer layout to write (e.g. from ``peer_layout_of``).

    Returns:
        The tensors under ``layout``'s keys.

    Raises:
        ValueError: a key the layout has no equivalent for.
    """
    rules = peer_rules(layout)
    peer_state_dict = {}
    for key, value in state_dict.items():
        peer_key = translate_key(key, rules)
        if peer_key == key:
            raise ValueError(f"{key!r} has no {layout.naming} equivalent.")
        peer_state_dict[peer_key] = value
    return peer_state_dict


def translate_key(key: str, rules: list[tuple[str, str]]) -> str:
    """Rewrite ``key``'s module path with the first matching (source, target) template; else unchanged."""
    module_path, _, parameter = key.rpartition(".")
    for source, target in rules:
        match = _template_regex(source).fullmatch(module_path)
        if match:
            numbers = _Numbers()
            for name, value in match.groupdict().items():
                base, start = _PLACEHOLDER.fullmatch(name).groups()
                numbers[base] = int(value) - int(start or 0)
            return f"{target.format_map(numbers)}.{parameter}"
    return key


class _Numbers(dict):
    """A template's numbers by placeholder: ``{stage}`` as matched, ``{stage1}`` / ``{stage2}`` counted from 1 / 2."""

    def __missing__(self, name: str) -> int:
        base, start = _PLACEHOLDER.fullmatch(name).groups()
        if not start:
            raise KeyError(f"the template's placeholder {{{name}}} matched nothing")
        return self[base] + int(start)


@cache
def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m[1]}>\\d+)", pattern)
    return re.compile(pattern)
