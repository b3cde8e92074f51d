"""The timm adapter against timm's own ResNets and segmentation_models_pytorch's "tu-" encoders."""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import timm
import timm.loss
import timm.optim
import timm.utils
import torch
import torchvision
from helpers import max_abs_diff, randomize_norms, slow_param
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import adapt_input_conv
from torch import nn

import resnet_backbone.adapters.timm as timm_adapter
from resnet_backbone import PRESETS, ResNetBackbone, ResNetConfig, ResNetForImageClassification, ResNetModel
from resnet_backbone.adapters.timm import MODEL_NAMES


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Callable[[str], str]:
    """``timm_file(name)``: a file with the weights of timm's own ``name`` (random, with randomised norm
    statistics), written once per module."""
    directory = tmp_path_factory.mktemp("timm")

    @functools.cache
    def write(name: str) -> str:
        path = directory / f"{name}.pth"
        torch.save(randomize_norms(timm.create_model(name)).state_dict(), path)
        return str(path)

    return write


def small_images(channels: int = 3) -> torch.Tensor:
    """One odd-sized image: enough to compare the ResNet-50s at output stride 8 cheaply."""
    return torch.randn(1, channels, 57, 75, generator=torch.Generator().manual_seed(2))


def from_file(name: str, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with the weights of a checkpoint file, in eval mode."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


# ---------------------------------------------------------------- registration


@pytest.mark.slow
def test_every_preset_is_registered_with_configs_that_name_its_modules():
    assert set(timm.list_models("rb_*")) == set(MODEL_NAMES) and len(MODEL_NAMES) == len(PRESETS)
    for preset in PRESETS:
        with torch.device("meta"):
            model = timm.create_model(f"rb_{preset}")
        cfg = model.pretrained_cfg
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert model.get_submodule(cfg["first_conv"]) is first_conv
        assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
        assert model.config == ResNetConfig.from_preset(preset, num_labels=1000)
        assert cfg["architecture"] == f"rb_{preset}" and cfg["num_classes"] == model.num_classes == 1000


@pytest.mark.slow
def test_timm_data_config_helpers_work():
    expected = dict(input_size=(3, 224, 224), interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD, crop_pct=0.875, crop_mode="center")  # fmt: skip
    model = timm.create_model("rb_resnet50d")
    assert timm.data.resolve_model_data_config(model) == timm.data.resolve_data_config({}, model=model) == expected
    features = timm.create_model("rb_resnet18", features_only=True, in_chans=1)
    assert timm.data.resolve_model_data_config(features) == expected  # as timm's: the pretrained weights' input
    transform = timm.data.create_transform(**expected)
    assert transform(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


def test_importing_again_registers_nothing_and_does_not_warn():
    entrypoints = {name: timm.models.model_entrypoint(name) for name in MODEL_NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(timm_adapter)
        assert {name: timm.models.model_entrypoint(name) for name in MODEL_NAMES} == entrypoints
        assert isinstance(timm.create_model("rb_resnet18", num_classes=0), timm_adapter.TimmResNet)


# ---------------------------------------------------------------- features_only


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50d"])
def test_features_equal_timms_own_features_only(name, timm_file):
    path, images = timm_file(name), small_images()
    for output_stride in (32, 16, 8):
        ours = from_file(f"rb_{name}", path, features_only=True, output_stride=output_stride)
        theirs = from_file(name, path, features_only=True, output_stride=output_stride)
        assert ours.feature_info.channels() == theirs.feature_info.channels()
        assert ours.feature_info.reduction() == theirs.feature_info.reduction()
        with torch.no_grad():
            mine, reference = ours(images), theirs(images)
        assert len(mine) == len(reference) == 5
        for feature, expected in zip(mine, reference):
            assert max_abs_diff(feature, expected) <= 1e-5, f"output_stride={output_stride}"


def test_feature_info_matches_a_real_forward():
    images = small_images()
    features = timm.create_model("rb_resnet50d", features_only=True, output_stride=8).eval()
    assert features.feature_info.reduction() == [2, 4, 8, 8, 8]
    hooked = []
    for module_name in features.feature_info.module_name():
        features.model.get_submodule(module_name).register_forward_hook(lambda m, i, output: hooked.append(output))
    with torch.no_grad():
        outputs = features(images)
    assert len(hooked) == len(outputs) == 5
    for output, hooked_output, channels, reduction in zip(
        outputs, hooked, features.feature_info.channels(), features.feature_info.reduction()
    ):
        assert output is hooked_output
        height, width = images.shape[-2:]
        assert output.shape[1:] == (channels, math.ceil(height / reduction), math.ceil(width / reduction))


@pytest.mark.slow
@pytest.mark.parametrize("out_indices", [(1, 2, 3, 4), (0, 2), (4,), 2, (-3, -1)])
def test_out_indices_select_what_timm_selects(out_indices, timm_file, images):
    path = timm_file("resnet18")
    ours = from_file("rb_resnet18", path, features_only=True, out_indices=out_indices)
    theirs = from_file("resnet18", path, features_only=True, out_indices=out_indices)
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    deepest = max(index % 5 for index in theirs.feature_info.out_indices)
    assert len(ours.model.encoder.stages) == deepest  # stages past the deepest feature are not kept
    with torch.no_grad():
        mine, reference = ours(images), theirs(images)
    assert len(mine) == len(reference)
    for feature, expected in zip(mine, reference):
        assert max_abs_diff(feature, expected) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("name", "in_chans"), [("resnet18", 1), ("resnet50d", 4)])
def test_in_chans_adapts_the_pretrained_first_conv_as_timm_does(name, in_chans, timm_file):
    path = timm_file(name)
    ours = from_file(f"rb_{name}", path, features_only=True, in_chans=in_chans)
    theirs = from_file(name, path, features_only=True, in_chans=in_chans)
    first_conv = ours.model.get_submodule(ours.pretrained_cfg["first_conv"])
    pretrained = torch.load(path)["conv1.0.weight" if name.endswith("d") else "conv1.weight"]
    assert torch.equal(first_conv.weight, adapt_input_conv(in_chans, pretrained))
    images = small_images(in_chans)
    with torch.no_grad():
        for feature, expected in zip(ours(images), theirs(images), strict=True):
            assert max_abs_diff(feature, expected) <= 1e-5


# ---------------------------------------------------------------- pretrained files


@pytest.mark.slow
@pytest.mark.parametrize(
    "source", ["torchvision file", slow_param("save_pretrained directory"), slow_param("safetensors file")]
)
def test_loads_checkpoints_of_this_project_and_torchvision(source, tmp_path, images):
    if source == "torchvision file":
        checkpoint = tmp_path / "resnet18.pth"
        torch.save(randomize_norms(torchvision.models.resnet18()).state_dict(), checkpoint)
    else:
        randomize_norms(ResNetForImageClassification.from_preset("resnet18", num_labels=10)).save_pretrained(tmp_path)
        checkpoint = tmp_path / "model.safetensors" if source == "safetensors file" else tmp_path
    # timm reads a directory (a save_pretrained one) with source="local-dir", a file without it.
    overlay = dict(file=str(checkpoint), source="local-dir" if checkpoint.is_dir() else "")
    ours = timm.create_model(
        "rb_resnet18", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, out_indices=(1, 2, 3, 4)
    )
    with pytest.warns(UserWarning, match="Dropped the checkpoint's classifier"):
        reference = ResNetBackbone.from_pretrained(checkpoint, out_indices=[1, 2, 3, 4])
    with torch.no_grad():
        for feature, expected in zip(ours.eval()(images), reference.eval()(images).feature_maps, strict=True):
            assert max_abs_diff(feature, expected) <= 1e-5


@pytest.mark.slow
def test_a_model_trained_through_timm_loads_back_into_this_projects_models(tmp_path, images):
    trained = randomize_norms(timm.create_model("rb_resnet18", num_classes=5)).eval()
    trained.save_pretrained(tmp_path)
    classifier = ResNetForImageClassification.from_pretrained(tmp_path).eval()
    reloaded = timm_adapter.TimmResNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_abs_diff(classifier(images).logits, trained(images)) <= 1e-5
        assert max_abs_diff(reloaded(images), trained(images)) <= 1e-5


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    ResNetModel.from_preset("resnet18").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a resnet18, but rb_resnet34 is a resnet34"):
        from_file("rb_resnet34", tmp_path / "model.safetensors", features_only=True)


# ---------------------------------------------------------------- classifier conventions


@pytest.mark.slow
def test_classifier_follows_timms_model_api(timm_file, images):
    ours, theirs = from_file("rb_resnet18", timm_file("resnet18")), from_file("resnet18", timm_file("resnet18"))
    assert (ours.num_classes, ours.num_features, ours.head_hidden_size, ours.in_chans) == (1000, 512, 512, 3)
    with torch.no_grad():
        assert max_abs_diff(ours(images), theirs(images)) <= 1e-5
        final, intermediates = ours.forward_intermediates(images)
        expected_final, expected_intermediates = theirs.forward_intermediates(images)
        for feature, expected in zip([final, *intermediates], [expected_final, *expected_intermediates], strict=True):
            assert max_abs_diff(feature, expected) <= 1e-5
        pre_logits = ours.forward_head(ours.forward_features(images), pre_logits=True)
        assert max_abs_diff(pre_logits, theirs.forward_head(theirs.forward_features(images), pre_logits=True)) <= 1e-5
        for model in (ours, theirs):
            model.reset_classifier(3)
        assert ours(images).shape == (2, 3) and ours.num_classes == ours.config.num_labels == 3
        for model in (ours, theirs):
            model.reset_classifier(0)
        assert max_abs_diff(ours(images), pre_logits) <= 1e-5
        for model in (ours, theirs):
            model.reset_classifier(0, global_pool="")
        assert max_abs_diff(ours(images), theirs(images)) <= 1e-5 and ours(images).ndim == 4
    headless = timm.create_model("rb_resnet18", num_classes=0, global_pool="max")
    assert headless(images).shape == (2, 512) and isinstance(headless.get_classifier(), nn.Identity)


@pytest.mark.slow
def test_grad_checkpointing_and_freezing_come_from_the_trunk(images):
    model = timm.create_model("rb_resnet18", num_classes=3, freeze_at=2, drop_rate=0.5).train()
    assert not any(p.requires_grad for p in model.encoder.stages[0].parameters())
    assert all(p.requires_grad for p in model.encoder.stages[1].parameters())
    assert model.embedder.embedder.normalization.training is False  # frozen norms stay in eval mode
    calls = Counter()
    for name in ("embedder.embedder", "encoder.stages.0", "encoder.stages.1"):
        model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: calls.update([name]))

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(0)  # the same dropout mask
        _, intermediates = model.forward_intermediates(images)
        (model(images).square().mean() + sum(f.mean() for f in intermediates)).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    with_checkpoints = gradients(True)
    # Two forward passes; the trainable stage runs again in each backward pass, the frozen ones do not.
    assert calls == {"embedder.embedder": 2, "encoder.stages.0": 2, "encoder.stages.1": 4}
    without = gradients(False)
    assert calls == {"embedder.embedder": 2, "encoder.stages.0": 2, "encoder.stages.1": 2}
    for gradient, expected in zip(with_checkpoints, without, strict=True):
        assert max_abs_diff(gradient, expected) <= 1e-6


@pytest.mark.slow
def test_timm_training_utilities_run_it():
    torch.manual_seed(0)
    model = timm.create_model("rb_resnet18", num_classes=4, drop_path_rate=0.1)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = model.get_classifier().weight.clone()
    loss = loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()
    ema.update(model)
    assert not torch.equal(model.get_classifier().weight, before)
    assert not torch.equal(ema.module.get_classifier().weight, model.get_classifier().weight)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(output_stride=4), "output_stride must be one of 8, 16, 32"),
        (dict(stem_width=32), "Unknown ResNetConfig field 'stem_width'"),
        (dict(features_only=True, out_indices=(1, 5)), r"feature index 5 is out of range \(0 to 4\)"),
        (dict(pretrained=True), r"rb_resnet18 has no weights to download\. .*pretrained_cfg_overlay=dict\(file=PATH\)"),
    ],
    ids=["output_stride", "unknown-argument", "out_indices", "pretrained-without-a-file"],
)
def test_bad_arguments_are_clear_errors(arguments, message):
    with pytest.raises((ValueError, AssertionError), match=message):
        timm.create_model("rb_resnet18", **arguments)


def test_bad_input_is_a_clear_error():
    model, features = timm.create_model("rb_resnet18"), timm.create_model("rb_resnet18", features_only=True)
    for forward in (model, features, model.forward_features):
        with pytest.raises(ValueError, match=r"must have 3 channels .* got shape \(1, 1, 32, 32\)"):
            forward(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'.* got 'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


# ---------------------------------------------------------------- segmentation_models_pytorch

SEGMENTERS = ["Unet", "DeepLabV3Plus-os8", *map(slow_param, ["FPN", "DeepLabV3Plus-os16"])]


def segmenter(architecture: str, encoder: str, depth: int, in_channels: int, classes: int = 2) -> nn.Module:
    """An smp model with a "tu-" encoder; small decoders keep the tests fast."""
    common = dict(encoder_weights=None, encoder_depth=depth, in_channels=in_channels, classes=classes)
    if architecture == "Unet":
        return smp.Unet(encoder, decoder_channels=(64, 32, 16, 16, 16)[:depth], **common)
    if architecture == "FPN":
        # smp's FPN predicts at stride 4 of a depth-5 encoder and shifts one level finer per depth less.
        return smp.FPN(encoder, decoder_pyramid_channels=64, decoder_segmentation_channels=32,
                       upsampling=2 ** (depth - 3), **common)  # fmt: skip
    output_stride = int(architecture.removeprefix("DeepLabV3Plus-os"))
    return smp.DeepLabV3Plus(encoder, encoder_output_stride=output_stride, decoder_channels=64, **common)


def check_forward_and_backward(model: nn.Module, images: torch.Tensor, classes: int) -> None:
    output = model.train()(images)
    assert output.shape == (images.shape[0], classes, *images.shape[-2:])
    output.square().mean().backward()
    unused = [name for name, p in model.encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, f"encoder parameters without gradients: {unused[:5]}"


@pytest.mark.parametrize(
    ("in_channels", "depth"),
    [(shape if shape == (3, 5) else slow_param(*shape)) for shape in itertools.product([1, 3], [3, 4, 5])],
)
@pytest.mark.parametrize("architecture", SEGMENTERS)
def test_smp_segmenters_with_a_tu_rb_encoder(architecture, in_channels, depth):
    torch.manual_seed(0)
    model = segmenter(architecture, "tu-rb_resnet18", depth, in_channels)
    assert model.encoder.out_channels == [in_channels, 64, 64, 128, 256, 512][: depth + 1]
    assert model.encoder.model.model.embedder.embedder.convolution.in_channels == in_channels
    check_forward_and_backward(model, torch.randn(2, in_channels, 32, 32), classes=2)


@pytest.mark.slow
def test_readme_smp_example_with_resnet50():
    torch.manual_seed(0)
    unet = smp.Unet("tu-rb_resnet50", encoder_weights=None, in_channels=1, classes=4)
    assert unet.encoder.out_channels == [1, 64, 256, 512, 1024, 2048]
    check_forward_and_backward(unet, torch.randn(2, 1, 64, 64), classes=4)


@pytest.mark.slow
def test_smp_encoder_weights_load_from_a_file_and_adapt_to_in_channels(timm_file, images):
    path = timm_file("resnet18")
    unet = smp.Unet("tu-rb_resnet18", encoder_weights=True, in_channels=1, pretrained_cfg_overlay=dict(file=path))
    theirs = from_file("resnet18", path, features_only=True, in_chans=1)
    gray = images[:, :1]
    with torch.no_grad():
        mine, reference = unet.encoder.eval()(gray), theirs(gray)
    assert len(mine) == len(reference) + 1 and mine[0] is gray  # smp puts the input first
    for feature, expected in zip(mine[1:], reference, strict=True):
        assert max_abs_diff(feature, expected) <= 1e-5


def synthetic_masks(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random rectangles per image, brighter than a noisy background; the masks mark them."""
    masks = torch.zeros(count, 1, size, size)
    for mask in masks:
        for _ in range(2):
            height, width = torch.randint(size // 6, size // 2, (2,), generator=generator).tolist()
            top = torch.randint(0, size - height, (1,), generator=generator).item()
            left = torch.randint(0, size - width, (1,), generator=generator).item()
            mask[:, top : top + height, left : left + width] = 1
    return masks + 0.5 * torch.randn(masks.shape, generator=generator), masks


def iou(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model.eval()(images) > 0
    model.train()
    return ((predicted & (masks > 0)).sum() / (predicted | (masks > 0)).sum()).item()


@pytest.mark.slow
def test_a_short_smp_unet_fine_tune_learns_synthetic_masks():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    test_images, test_masks = synthetic_masks(16, 32, generator)
    chance = test_masks.mean().item()  # the IoU of marking every pixel
    model = segmenter("Unet", "tu-rb_resnet18", depth=3, in_channels=1, classes=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = iou(model, test_images, test_masks)
    for _ in range(25):
        images, masks = synthetic_masks(8, 32, generator)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = iou(model, test_images, test_masks)
    assert before < 0.4 and chance < 0.3 and after > 0.75, (before, chance, after)
