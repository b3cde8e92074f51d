"""The four libraries' ResNet feature extractors, built with the same weights and the same stages."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torchvision
import transformers
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from resnet_backbone import ResNetBackbone

ARCHITECTURES = ("resnet18", "resnet50", "resnet101")
REFERENCE_LIBRARY = "torchvision"
OURS = "resnet_backbone"
LIBRARIES = (REFERENCE_LIBRARY, OURS, "timm", "transformers")
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def build_peers(architecture: str) -> dict[str, nn.Module]:
    """Each library's model, returning the outputs of torchvision's ``layer1`` to ``layer4``, all in eval mode.

    torchvision's model keeps its own random initialisation (the speed of dense convolutions does not depend on
    the values); the others get the same weights through this project's converters, so their outputs agree.
    """
    torch.manual_seed(0)
    classifier = getattr(torchvision.models, architecture)()
    ours = ResNetBackbone.from_torchvision(
        {key: value for key, value in classifier.state_dict().items() if not key.startswith("fc.")},
        out_features=STAGES,
    )
    timm_model = timm.create_model(architecture, features_only=True, out_indices=(1, 2, 3, 4))
    timm_model.load_state_dict(ours.to_timm_state_dict())
    transformers_model = transformers.ResNetBackbone(transformers.ResNetConfig.from_dict(ours.config.to_dict()))
    transformers_model.load_state_dict(ours.state_dict())
    torchvision_model = IntermediateLayerGetter(classifier, {f"layer{i}": name for i, name in enumerate(STAGES, 1)})
    models = {
        "torchvision": torchvision_model,
        "resnet_backbone": ours,
        "timm": timm_model,
        "transformers": transformers_model,
    }
    return {library: models[library].eval() for library in LIBRARIES}


def feature_maps(output: Any) -> list[torch.Tensor]:
    """The feature maps in any of the four libraries' output types."""
    if hasattr(output, "feature_maps"):  # this project and transformers (whose outputs are also dicts)
        return list(output.feature_maps)
    if isinstance(output, dict):  # torchvision: an OrderedDict by stage name
        return list(output.values())
    return list(output)  # timm: a list
