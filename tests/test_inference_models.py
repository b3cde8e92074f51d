"""optimize_for_inference on whole detectors and segmenters: the same detections and logits as torchvision's own
models (same weights, randomised norm statistics), BatchNorm folded wherever it follows a convolution, and the
dense parts in channels_last and low precision while boxes and post-processing stay float32."""

from __future__ import annotations

import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
from helpers import TINY_BOTTLENECK, max_abs_diff, randomize_norms
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as torchvision_resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import resnet_backbone.adapters.timm  # noqa: F401  (registers the tu-rb_ encoders with timm)
from resnet_backbone import (
    ResNetBackbone,
    compile_for_training,
    computes_bf16_natively,
    dense_parts,
    optimize_for_inference,
    register_dense_parts,
)
from resnet_backbone.adapters.torchvision import build_detector, build_segmenter, load_torchvision_weights
from resnet_backbone.inference import FLOAT32_TOLERANCE, LOW_PRECISION_TOLERANCE
from resnet_backbone.model_parts import FOLDABLE_NORMS
from resnet_backbone.prepacked import PrepackedConv2d

SMALL_DETECTION = dict(min_size=96, max_size=128)
# Faster R-CNN (an RPN and RoI heads) and RetinaNet (a one-stage head): torchvision's classes on its own
# ResNet-18 FPN (its resnet50 builders at a fraction of the cost), with the levels and extra blocks of its
# <kind>_resnet50_fpn builders, and score thresholds that keep dozens of detections of the random models.
DETECTORS = {
    "fasterrcnn": (detection.FasterRCNN, [1, 2, 3, 4], None, dict(box_score_thresh=0.2)),
    "retinanet": (detection.RetinaNet, [2, 3, 4], LastLevelP6P7(256, 256), dict(score_thresh=0.01)),
}


def torchvision_detector(kind: str) -> nn.Module:
    """torchvision's own detector with random weights, randomised norm statistics and the small box deltas of
    a trained one: random regression weights put boxes at the clamp of the deltas' exp, where a difference in
    the last bit of a feature moves a box by a pixel."""
    model_class, levels, extra_blocks, options = DETECTORS[kind]
    backbone = torchvision_resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, returned_layers=levels, extra_blocks=extra_blocks
    )
    model = randomize_norms(model_class(backbone, num_classes=5, **SMALL_DETECTION, **options).eval())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("bbox_pred.weight", "bbox_reg.weight")):
                parameter.mul_(0.01)
    return model


def detection_images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.rand(3, 100, 128, generator=generator), torch.rand(3, 120, 90, generator=generator)]


def assert_same_detections(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same boxes with the same labels, to 1e-3 of the image scale, in any order among equal scores."""
    assert len(expected["boxes"]) > 0
    assert torch.equal(actual["labels"].sort().values, expected["labels"].sort().values)
    tolerance = 1e-3 * expected["boxes"].abs().max()
    for label in expected["labels"].unique():
        mine, theirs = actual["boxes"][actual["labels"] == label], expected["boxes"][expected["labels"] == label]
        distances = torch.cdist(mine, theirs, p=float("inf"))
        assert distances.min(0).values.max() <= tolerance and distances.min(1).values.max() <= tolerance
    if "masks" in expected:
        assert max_abs_diff(actual["masks"].sum(0), expected["masks"].sum(0)) <= 1e-3


def assert_optimized_detects_as(reference_model: nn.Module, optimized: nn.Module) -> None:
    with torch.no_grad():
        expected, actual = reference_model(detection_images()), optimized(detection_images())
    for mine, reference in zip(actual, expected, strict=True):
        assert_same_detections(mine, reference)


def relative_diff(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return max_abs_diff(reference, actual) / reference.abs().max().item()


def assert_folded_and_channels_last(model: nn.Module) -> None:
    for name, part in dense_parts(model).items():
        norms = (*FOLDABLE_NORMS, TorchvisionFrozenBatchNorm2d)
        assert not any(isinstance(module, norms) for module in part.modules()), name
        for parameter in part.parameters():
            if parameter.ndim == 4:
                assert parameter.is_contiguous(memory_format=torch.channels_last), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", DETECTORS)
def test_optimized_detector_gives_the_detections_of_torchvisions_own_model(kind):
    """torchvision's detector, its weights loaded into ours, ours optimised: the detections stay torchvision's."""
    theirs = torchvision_detector(kind)
    ours = build_detector(kind, "resnet18", num_classes=5, **SMALL_DETECTION, **DETECTORS[kind][3]).eval()
    load_torchvision_weights(ours, theirs)
    optimized = optimize_for_inference(ours)
    assert_folded_and_channels_last(optimized)
    assert_optimized_detects_as(theirs, optimized)


@pytest.mark.slow
def test_torchvisions_own_detector_is_optimised_with_its_frozen_norms_folded():
    """torchvision's model as it comes (its ResNet with torchvision's FrozenBatchNorm2d), no weights moved."""
    theirs = torchvision_detector("fasterrcnn")
    assert any(isinstance(module, TorchvisionFrozenBatchNorm2d) for module in theirs.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every norm follows a convolution: nothing to warn about
        optimized = optimize_for_inference(theirs)
    assert_folded_and_channels_last(optimized)
    assert_optimized_detects_as(theirs, optimized)


def test_detector_dense_parts_are_backbone_fpn_and_heads_and_the_rest_stays_eager():
    model = build_detector("fasterrcnn", ResNetBackbone(**TINY_BOTTLENECK), num_classes=3, **SMALL_DETECTION)
    assert list(dense_parts(model)) == ["backbone.body", "backbone.fpn", "rpn.head"]
    retinanet = build_detector("retinanet", ResNetBackbone(**TINY_BOTTLENECK), num_classes=3)
    assert list(dense_parts(retinanet)) == ["backbone.body", "backbone.fpn", "head"]
    assert list(dense_parts(model.backbone)) == ["body", "fpn"]
    backbone = ResNetBackbone(**TINY_BOTTLENECK)
    assert dense_parts(backbone) == {"": backbone}


@pytest.mark.parametrize("kind", ["deeplabv3", "fcn"])
def test_optimized_segmenter_gives_the_same_logits(kind, images):
    """build_segmenter equals torchvision's own segmenters (tests/test_adapter_torchvision.py); here its
    optimised copy equals it, the auxiliary head included."""
    backbone = ResNetBackbone(**TINY_BOTTLENECK, output_stride=8)
    original = randomize_norms(build_segmenter(kind, backbone, num_classes=4, aux_loss=True)).eval()
    optimized = optimize_for_inference(original)
    assert list(dense_parts(optimized)) == ["backbone", "classifier", "aux_classifier"]
    assert_folded_and_channels_last(optimized)
    with torch.no_grad():
        expected, actual = original(images), optimized(images)
    assert list(actual) == list(expected) == ["out", "aux"]
    for key in expected:
        assert relative_diff(expected[key], actual[key]) <= FLOAT32_TOLERANCE


def tiny_fcn() -> nn.Module:
    backbone = ResNetBackbone(**dict(TINY_BOTTLENECK, depths=[1, 1, 1, 1]), output_stride=8)
    return randomize_norms(build_segmenter("fcn", backbone, num_classes=3)).eval()


def test_low_precision_runs_the_dense_parts_and_keeps_outputs_float32(images):
    original = tiny_fcn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = optimize_for_inference(original, dtype=torch.bfloat16)
    slower = [str(w.message) for w in caught if "slower than float32" in str(w.message)]
    assert len(slower) == (0 if computes_bf16_natively() else 1)
    assert {p.dtype for p in optimized.backbone.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        expected, actual = original(images)["out"], optimized(images)["out"]
    assert actual.dtype == torch.float32
    assert relative_diff(expected, actual) <= LOW_PRECISION_TOLERANCE


@pytest.mark.slow
def test_smp_unet_with_a_tu_rb_encoder_gives_the_same_logits(images):
    original = smp.Unet("tu-rb_resnet18", encoder_weights=None, decoder_channels=(64, 32, 16, 16, 16), classes=3)
    original = randomize_norms(original).eval()
    optimized = optimize_for_inference(original)
    assert list(dense_parts(optimized)) == ["encoder", "decoder", "segmentation_head"]
    assert_folded_and_channels_last(optimized)
    pixel_values = images[:, :, :96, :128]
    with torch.no_grad():
        assert relative_diff(original(pixel_values), optimized(pixel_values)) <= FLOAT32_TOLERANCE


@pytest.mark.slow
def test_compiled_segmenter_matches_and_its_weights_are_frozen(images):
    original = tiny_fcn()
    optimized = optimize_for_inference(original, compile=True)
    pixel_values = images[:1, :, :64, :64]
    with torch.no_grad():
        expected = original(pixel_values)["out"]
        compiled = optimized(pixel_values)["out"]
        assert relative_diff(expected, compiled) <= FLOAT32_TOLERANCE
        optimized.classifier[-1].weight.mul_(2)
        assert torch.equal(optimized(pixel_values)["out"], compiled), "weights are constants, as documented"


def test_a_norm_that_follows_no_convolution_is_left_and_named_once():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match=r"left 1 norm\(s\) of Sequential unfolded .*: 3\. They run as before"):
        optimized = optimize_for_inference(model)
    assert [type(m) for m in optimized] == [PrepackedConv2d, nn.Identity, nn.ReLU, nn.BatchNorm2d]
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert relative_diff(model(pixel_values), optimized(pixel_values)) <= FLOAT32_TOLERANCE


def test_parts_replace_the_declared_ones_and_a_wrong_name_is_a_clear_error(images):
    original = tiny_fcn()
    optimized = optimize_for_inference(original, dtype=torch.bfloat16, parts=["classifier"])
    assert {p.dtype for p in optimized.classifier.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in optimized.backbone.parameters()} == {torch.float32}
    with torch.no_grad():
        expected, actual = original(images)["out"], optimized(images)["out"]
    assert actual.dtype == torch.float32
    assert relative_diff(expected, actual) <= LOW_PRECISION_TOLERANCE
    compile_for_training(original, parts=["backbone"])  # compiles at the first call: nothing runs here
    assert original.backbone._compiled_call_impl is not None and original.classifier._compiled_call_impl is None
    with pytest.raises(ValueError, match=r"FCN has no submodule 'clasifier'\. Did you mean 'classifier'\?"):
        optimize_for_inference(original, parts=["clasifier"])
    with pytest.raises(ValueError, match=r"parts must not nest: 'backbone\.backbone' lies inside 'backbone'"):
        dense_parts(original, ["backbone", "backbone.backbone"])


class TwoStageNet(nn.Module):
    """A user's own model, with attribute names that torchvision's detectors also use."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values)).softmax(1)


def test_a_model_without_declared_parts_is_one_part_with_a_warning_until_declared(images):
    """No attribute name is guessed: an undeclared class is optimised as a whole, and low precision or compiling
    says so and how to declare its parts; a declaration or ``parts`` replaces the whole."""
    model = randomize_norms(TwoStageNet()).eval()
    assert dense_parts(model) == {"": model}
    with pytest.warns(UserWarning, match=r"no dense parts are declared for TwoStageNet .* pass parts=\[\.\.\.\]"):
        optimized = optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.no_grad():
        assert optimized(images).dtype == torch.float32
        assert relative_diff(model(images), optimized(images)) <= LOW_PRECISION_TOLERANCE
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no dense parts are declared")
        optimize_for_inference(model)  # float32 and eager: the parts change nothing, so nothing to say
        optimize_for_inference(model, dtype=torch.bfloat16, parts=[""])

    class DeclaredTwoStageNet(TwoStageNet):
        pass

    register_dense_parts(DeclaredTwoStageNet, ["backbone"])
    declared = DeclaredTwoStageNet().eval()
    assert list(dense_parts(declared)) == ["backbone"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no dense parts are declared")
        optimized = optimize_for_inference(declared, dtype=torch.bfloat16)
    assert {p.dtype for p in optimized.head.parameters()} == {torch.float32}
