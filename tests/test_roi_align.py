"""The fast path's RoI pooling for torchvision's two-stage detectors against torchvision's own
``MultiScaleRoIAlign``: the same pooled features for boxes anywhere (inside, across the border, outside, tiny),
and torchvision's own pooling wherever the sparse product does not apply."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from resnet_backbone import ResNetBackbone, optimize_for_inference
from resnet_backbone.adapters.torchvision import build_detector
from resnet_backbone.adapters.torchvision_roi_align import SparseMultiScaleRoIAlign

LEVELS = ["0", "1", "2", "3"]
IMAGE_SIZES = [(120, 160), (96, 140)]


def feature_maps(memory_format: torch.memory_format, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(2, 8, 120 // 2 ** (level + 2), 160 // 2 ** (level + 2), generator=generator).contiguous(
            memory_format=memory_format
        )
        for level, name in enumerate(LEVELS)
    }


def boxes_everywhere(seed: int = 1) -> list[torch.Tensor]:
    """Random boxes of every size, and the awkward ones: across and beyond the border, degenerate, tiny."""
    generator = torch.Generator().manual_seed(seed)
    awkward = torch.tensor(
        [[-30.0, -20, 10, 15], [150, 110, 400, 300], [0, 0, 160, 120], [50, 40, 50, 40], [3.3, 4.1, 3.4, 4.2],
         [158, 118, 160, 120], [-50, -50, -20, -20], [0, 0, 1, 1]]
    )  # fmt: skip
    per_image = []
    for _ in IMAGE_SIZES:
        corners = torch.rand(40, 2, generator=generator) * torch.tensor([160.0, 120.0])
        sizes = torch.rand(40, 2, generator=generator) ** 2 * torch.tensor([160.0, 120.0])
        per_image.append(torch.cat([awkward, torch.cat([corners, corners + sizes], 1)]))
    return per_image


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("levels", "output_size", "sampling_ratio"), [(LEVELS, 7, 2), (LEVELS, 14, 2), (["0"], 7, 1),
                                                                        (LEVELS[:3], (5, 3), 3)])  # fmt: skip
def test_pools_what_torchvision_pools(memory_format, levels, output_size, sampling_ratio):
    theirs = MultiScaleRoIAlign(levels, output_size, sampling_ratio)
    ours = SparseMultiScaleRoIAlign.from_module(theirs)
    features, boxes = feature_maps(memory_format), boxes_everywhere()
    with torch.no_grad():
        expected = theirs(features, boxes, IMAGE_SIZES)
        actual = ours(features, boxes, IMAGE_SIZES)
        assert ours.scales == theirs.scales  # the level setup is torchvision's
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert actual.is_contiguous(memory_format=torch.channels_last)
        empty = ours(features, [boxes[0][:0], boxes[1][:0]], IMAGE_SIZES)
    assert empty.shape == (0, 8, *expected.shape[-2:])


def test_torchvisions_pooling_runs_where_the_sparse_product_does_not_apply():
    """An adaptive sampling ratio (its sample count varies per RoI), autograd, and another dtype."""
    features, boxes = feature_maps(torch.contiguous_format), boxes_everywhere()
    adaptive = MultiScaleRoIAlign(LEVELS, 7, sampling_ratio=0)
    with torch.no_grad():
        expected = adaptive(features, boxes, IMAGE_SIZES)
        torch.testing.assert_close(
            SparseMultiScaleRoIAlign.from_module(adaptive)(features, boxes, IMAGE_SIZES), expected
        )
    pooler = SparseMultiScaleRoIAlign.from_module(MultiScaleRoIAlign(LEVELS, 7, 2))
    trainable = {name: value.requires_grad_() for name, value in features.items()}
    pooler(trainable, boxes, IMAGE_SIZES).sum().backward()
    assert all(value.grad is not None for value in trainable.values())
    with torch.no_grad():
        double = pooler(
            {name: value.double() for name, value in features.items()}, [b.double() for b in boxes], IMAGE_SIZES
        )
    torch.testing.assert_close(
        double, MultiScaleRoIAlign(LEVELS, 7, 2)(features, boxes, IMAGE_SIZES).double(), rtol=1e-5, atol=1e-5
    )


def test_the_fast_path_pools_two_stage_detectors_sparsely_and_leaves_the_caller_model_as_it_was():
    backbone = ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1])
    detector = build_detector("maskrcnn", backbone, num_classes=3, min_size=96, max_size=128).eval()
    optimized = optimize_for_inference(detector)
    for name in ("box_roi_pool", "mask_roi_pool"):
        assert type(getattr(detector.roi_heads, name)) is MultiScaleRoIAlign
        assert type(getattr(optimized.roi_heads, name)) is SparseMultiScaleRoIAlign
