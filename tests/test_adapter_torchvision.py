"""The torchvision adapter against torchvision's own detectors, segmenters and FPN backbone."""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, randomize_norms, slow_param
from torchvision.models import detection, segmentation
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as torchvision_resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from resnet_backbone import CheckpointMismatchError, ResNetBackbone
from resnet_backbone.adapters.torchvision import (
    ResNetBody,
    build_detector,
    build_segmenter,
    load_torchvision_weights,
    resnet_fpn_backbone,
)
from resnet_backbone.layers import FrozenBatchNorm2d
from resnet_backbone.weights import load_checkpoint

SMALL_DETECTION = dict(min_size=96, max_size=128)


def test_fpn_backbone_outputs_what_torchvisions_gives():
    images = torch.randn(2, 3, 128, 192)
    ours = resnet_fpn_backbone("resnet18", trainable_layers=3).eval()
    theirs = torchvision_resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3).eval()
    with torch.no_grad():
        mine, reference = ours(images), theirs(images)
    assert list(mine) == list(reference) == ["0", "1", "2", "3", "pool"]
    assert [f.shape for f in mine.values()] == [f.shape for f in reference.values()]
    assert ours.out_channels == theirs.out_channels == 256
    shapes = ours.output_shape()
    assert list(shapes) == list(mine) and ours.size_divisibility == 32
    for name, feature in mine.items():
        assert shapes[name] == (feature.shape[1], images.shape[-1] // feature.shape[-1])


@pytest.mark.parametrize(
    ("name", "trainable_layers"), [("resnet18", 3), *(slow_param("resnet50", layers) for layers in range(6))]
)
def test_trainable_layers_freeze_what_torchvision_freezes(name, trainable_layers):
    ours = resnet_fpn_backbone(name, norm_layer="frozen_batch", trainable_layers=trainable_layers)
    theirs = torchvision_resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=trainable_layers)

    def trainable(model):
        return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name.startswith("body."))

    assert trainable(ours) == trainable(theirs)
    assert ours.body.backbone.config.freeze_at == 5 - trainable_layers


@pytest.mark.slow
def test_norms_default_to_frozen_when_weights_are_loaded_as_torchvision(tmp_path):
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in resnet_fpn_backbone("resnet18").modules())
    ResNetBackbone.from_preset("resnet18").save_pretrained(tmp_path)
    loaded = resnet_fpn_backbone(str(tmp_path))
    norms = [m for m in loaded.body.modules() if hasattr(m, "running_var")]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert loaded.body.backbone.config.freeze_at == 2  # trainable_layers defaults to 3 with weights


def test_extra_blocks_p6p7_and_bad_arguments(images):
    fpn = resnet_fpn_backbone("resnet18", out_features=["stage2", "stage3", "stage4"],
                              extra_blocks=LastLevelP6P7(256, 256))  # fmt: skip
    with torch.no_grad():
        features = fpn(images)
    assert list(features) == ["0", "1", "2", "p6", "p7"] == list(fpn.output_shape())
    assert fpn.output_shape()["p7"] == (256, 128)
    with pytest.raises(ValueError, match="LastLevelMaxPool or LastLevelP6P7"):
        resnet_fpn_backbone("resnet18", extra_blocks=torch.nn.Identity())
    with pytest.raises(ValueError, match="between 0 and 5"):
        resnet_fpn_backbone("resnet18", trainable_layers=6)
    with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
        resnet_fpn_backbone("resnet81")
    with pytest.raises(ValueError, match="Unknown detector 'faster_rcnn'. Did you mean 'fasterrcnn'"):
        build_detector("faster_rcnn")


@pytest.mark.slow
def test_the_body_returns_named_features_and_a_whole_detector_scripts(tmp_path):
    backbone = ResNetBackbone.from_preset("resnet18", out_features=["stage2", "stage4"]).eval()
    body = ResNetBody(backbone)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = body(x)
        assert list(features) == ["stage2", "stage4"]
        assert all(torch.equal(a, b) for a, b in zip(features.values(), backbone(x).feature_maps, strict=True))
        assert torch.equal(torch.jit.script(body)(x)["stage4"], features["stage4"])

    detector = build_detector("fasterrcnn", "resnet18", num_classes=3, **SMALL_DETECTION).eval()
    scripted = torch.jit.script(detector)
    scripted.save(tmp_path / "detector.pt")
    reloaded = torch.jit.load(tmp_path / "detector.pt")
    images = [torch.rand(3, 90, 120), torch.rand(3, 110, 100)]
    with torch.no_grad():
        batch = detector.transform(images)[0].tensors
        for mine, reference in zip(reloaded.backbone(batch).values(), detector.backbone(batch).values(), strict=True):
            assert torch.equal(mine, reference)
        # Eager and scripted torchvision detectors may order tied scores differently (torchvision's own do
        # too), so the detections are compared between the scripted model and its reloaded copy.
        _, expected = scripted(images)
        _, actual = reloaded(images)
    for mine, reference in zip(actual, expected, strict=True):
        assert torch.equal(mine["boxes"], reference["boxes"]) and torch.equal(mine["scores"], reference["scores"])


@pytest.mark.slow
def test_the_body_follows_the_backbones_selection_eagerly_and_when_scripted():
    backbone = ResNetBackbone.from_preset("resnet18").eval()
    body = ResNetBody(backbone)
    backbone.out_features = ["stage1", "stage3"]  # after the body was built
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = body(x)
        scripted = torch.jit.script(body)(x)
    assert list(features) == list(body.output_shape()) == list(scripted) == ["stage1", "stage3"]
    for (name, feature), (channels, stride) in zip(features.items(), body.output_shape().values(), strict=True):
        assert feature.shape[1:] == (channels, 64 // stride, 96 // stride)
        assert torch.equal(scripted[name], feature)  # the scripted stage loop computes what the eager one does
    assert body.size_divisibility == backbone.size_divisibility == 16


# ---------------------------------------------------------------- parity with torchvision's models


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "builder", "threshold"),
    [
        ("fasterrcnn", detection.fasterrcnn_resnet50_fpn, "box_score_thresh"),
        ("retinanet", detection.retinanet_resnet50_fpn, "score_thresh"),
        ("maskrcnn", detection.maskrcnn_resnet50_fpn, "box_score_thresh"),
    ],
)
def test_torchvision_detector_weights_give_identical_features_and_detections(kind, builder, threshold):
    options = dict(SMALL_DETECTION, **{threshold: 0.0})
    theirs = randomize_norms(builder(weights=None, weights_backbone=None, num_classes=5, **options).eval())
    ours = build_detector(kind, "resnet50", num_classes=5, **options).eval()
    load_torchvision_weights(ours, theirs.state_dict())
    images = [torch.rand(3, 100, 128, generator=torch.Generator().manual_seed(2)), torch.rand(3, 120, 90)]
    with torch.no_grad():
        batch = torch.randn(1, 3, 96, 128)
        for mine, reference in zip(ours.backbone(batch).values(), theirs.backbone(batch).values(), strict=True):
            assert max_abs_diff(mine, reference) <= 1e-5
        expected, actual = theirs(images), ours(images)
    for mine, reference in zip(actual, expected, strict=True):
        assert len(reference["boxes"]) > 0
        assert max_abs_diff(mine["boxes"], reference["boxes"]) <= 1e-4
        assert max_abs_diff(mine["scores"], reference["scores"]) <= 1e-5
        assert torch.equal(mine["labels"], reference["labels"])
        if "masks" in reference:
            assert max_abs_diff(mine["masks"], reference["masks"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("aux_loss", [False, True])
def test_torchvision_deeplabv3_weights_give_identical_logits(aux_loss, images):
    theirs = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=aux_loss)
    theirs = randomize_norms(theirs.eval())
    ours = build_segmenter("deeplabv3", "resnet50", num_classes=4, aux_loss=aux_loss).eval()
    assert ours.backbone.backbone.strides == [8] * (2 if aux_loss else 1)
    load_torchvision_weights(ours, theirs)
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert list(actual) == list(expected)
    for key in expected:
        assert max_abs_diff(actual[key], expected[key]) <= 1e-5


@pytest.mark.slow
def test_weights_of_another_model_kind_are_refused_and_nothing_is_loaded():
    theirs = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    ours = build_detector("fasterrcnn", "resnet50", num_classes=5)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)does not fit this FasterRCNN.*missing .*rpn\..*unexpected .*head\."
    ):
        load_torchvision_weights(ours, theirs)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_a_mis_shaped_detector_checkpoint_fails_as_a_mis_shaped_backbone_checkpoint_does():
    """One loader: the same error type, report fields and 'nothing was loaded' promise as the core's."""
    theirs = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7)
    ours = build_detector("fasterrcnn", "resnet50", num_classes=5)
    with pytest.raises(CheckpointMismatchError, match="nothing was loaded") as detector_error:
        load_torchvision_weights(ours, theirs)
    mis_shaped = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight"}
    assert mis_shaped <= {key for key, _, _ in detector_error.value.report.mismatched_keys}
    assert not detector_error.value.report.missing_keys and not detector_error.value.report.unexpected_keys

    backbone_checkpoint = ResNetBackbone.from_preset("resnet18").state_dict()
    with pytest.raises(CheckpointMismatchError, match="nothing was loaded") as backbone_error:
        load_checkpoint(ResNetBackbone.from_preset("resnet50"), backbone_checkpoint)
    assert type(backbone_error.value) is type(detector_error.value)
    assert backbone_error.value.report.mismatched_keys or backbone_error.value.report.missing_keys

    report = load_torchvision_weights(ours, theirs, strict=False)
    assert ours.load_report is report and not report.is_exact
    assert {key for key, _, _ in report.mismatched_keys} >= mis_shaped


# ---------------------------------------------------------------- every builder trains


def _detection_targets(kind: str, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    targets = []
    for height, width in sizes:
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [30.0, 20.0, 80.0, 70.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if kind == "maskrcnn":
            target["masks"] = torch.zeros(2, height, width, dtype=torch.uint8)
            target["masks"][:, 15:55, 15:55] = 1
        if kind == "keypointrcnn":
            target["labels"] = torch.tensor([1, 1])
            target["keypoints"] = torch.tensor([[[20.0, 30.0, 1.0]] * 17, [[40.0, 40.0, 1.0]] * 17])
        targets.append(target)
    return targets


def _stage_gradients(backbone: ResNetBackbone) -> list[bool]:
    return [
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in backbone.stage_modules()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos"])
def test_every_detector_builder_trains_one_step_and_then_predicts(kind):
    model = build_detector(kind, "resnet18", num_classes=3, trainable_layers=3, **SMALL_DETECTION).train()
    sizes = [(96, 128), (112, 96)]
    images = [torch.rand(3, *size) for size in sizes]
    losses = model(images, _detection_targets(kind, sizes))
    total = sum(losses.values())
    assert all(torch.isfinite(loss) for loss in losses.values())
    total.backward()
    assert _stage_gradients(model.backbone.body.backbone) == [False, False, True, True, True]
    with torch.no_grad():
        predictions = model.eval()(images)
    assert len(predictions) == 2 and all(p["boxes"].shape[-1] == 4 for p in predictions)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deeplabv3", "fcn"])
def test_every_segmenter_builder_trains_one_step_and_then_predicts(kind):
    model = build_segmenter(kind, "resnet18", num_classes=3, aux_loss=True).train()
    images = torch.rand(2, 3, 72, 88)
    outputs = model(images)
    target = torch.randint(0, 3, (2, 72, 88))
    loss = torch.nn.functional.cross_entropy(outputs["out"], target) + 0.5 * torch.nn.functional.cross_entropy(
        outputs["aux"], target
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert all(_stage_gradients(model.backbone.backbone))
    with torch.no_grad():
        assert model.eval()(images)["out"].shape == (2, 3, 72, 88)


@pytest.mark.slow
def test_frozen_stages_stay_bit_identical_through_training():
    model = build_detector("fcos", "resnet18", num_classes=3, trainable_layers=2, **SMALL_DETECTION).train()
    backbone = model.backbone.body.backbone
    frozen = {
        k: v.clone()
        for k, v in backbone.state_dict().items()
        if k.startswith(("embedder", "encoder.stages.0", "encoder.stages.1"))
    }
    trainable_before = backbone.encoder.stages[2].state_dict()["layers.0.layer.0.normalization.running_mean"].clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    sizes = [(96, 128), (112, 96)]
    for _ in range(3):
        optimizer.zero_grad()
        sum(model([torch.rand(3, *s) for s in sizes], _detection_targets("fcos", sizes)).values()).backward()
        optimizer.step()
    state = backbone.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in frozen.items())
    assert not torch.equal(trainable_before, state["encoder.stages.2.layers.0.layer.0.normalization.running_mean"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "builder"),
    [("fasterrcnn", detection.fasterrcnn_resnet50_fpn), ("retinanet", detection.retinanet_resnet50_fpn),
     ("fcos", detection.fcos_resnet50_fpn)],
)  # fmt: skip
def test_other_fpn_levels_get_anchors_by_torchvisions_per_stride_rule(kind, builder):
    theirs, ours = builder(weights=None, weights_backbone=None), build_detector(kind, "resnet18")
    expected = theirs.rpn.anchor_generator if kind == "fasterrcnn" else theirs.anchor_generator
    actual = ours.rpn.anchor_generator if kind == "fasterrcnn" else ours.anchor_generator
    # The rule written per stride reproduces torchvision's default anchors on its default levels ...
    assert (actual.sizes, actual.aspect_ratios) == (expected.sizes, expected.aspect_ratios)
    # ... and a detector on two stages only gets two-level anchors (and poolers) that train.
    model = build_detector(kind, "resnet18", num_classes=3, out_features=["stage2", "stage3"], **SMALL_DETECTION)
    levels = list(model.backbone.output_shape())
    anchors = model.rpn.anchor_generator if kind == "fasterrcnn" else model.anchor_generator
    assert len(anchors.sizes) == len(levels)
    if kind == "fasterrcnn":
        assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1"]
    sizes = [(96, 128), (112, 96)]
    losses = model.train()([torch.rand(3, *s) for s in sizes], _detection_targets(kind, sizes))
    assert all(torch.isfinite(loss) for loss in losses.values())
