"""optimize_for_inference against the unoptimised model: same outputs (within the documented tolerance),
same output type, and the caller's model left as it was."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ALL_STAGES, TINY_BASIC, TINY_BOTTLENECK, max_abs_diff, randomize_norms, slow_param
from torch import nn

from resnet_backbone import (
    BackboneOutput,
    ResNetBackbone,
    ResNetForImageClassification,
    ResNetModel,
    computes_bf16_natively,
    optimize_for_inference,
)
from resnet_backbone.compiled_speed import CALLS_TIMED, CHECK_VARIABLE, CompiledSpeedCheck
from resnet_backbone.layers import NORM_TYPES, ConvLayer
from resnet_backbone.torch_compat import compile_without_autograd

FLOAT32_TOLERANCE = 1e-4  # times the feature scale, as documented
LOW_PRECISION_TOLERANCE = 5e-2

CONFIGS = {
    "resnet50": dict(preset="resnet50"),
    "resnet18": dict(preset="resnet18"),
    "tiny-bottleneck": TINY_BOTTLENECK,
    "tiny-basic": TINY_BASIC,
    "deep-stem-avg-down-os8": dict(TINY_BOTTLENECK, stem_type="deep", avg_down=True, output_stride=8),
    "basic-os16-gelu": dict(TINY_BASIC, output_stride=16, hidden_act="gelu"),
    "resnext-groups": dict(TINY_BOTTLENECK, groups=4, width_per_group=8),
    "frozen-batch": dict(TINY_BOTTLENECK, norm_layer="frozen_batch"),
}
GROUP_NORM = dict(embedding_size=32, hidden_sizes=[128, 256, 384, 512], depths=[1, 1, 1, 1], norm_layer="group")


def backbone(model_class: type = ResNetBackbone, preset: str | None = None, **fields) -> nn.Module:
    """Random weights and norm statistics, every stage an output, eval mode."""
    if model_class is ResNetBackbone:
        fields["out_features"] = ALL_STAGES
    model = model_class.from_preset(preset, **fields) if preset else model_class(**fields)
    return randomize_norms(model).eval()


def relative_diff(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Max abs difference relative to the feature scale (the reference's largest absolute value)."""
    return max_abs_diff(reference, actual) / reference.abs().max().item()


def assert_same_features(reference: BackboneOutput, actual: BackboneOutput, tolerance: float) -> None:
    assert type(actual) is type(reference)
    assert len(actual.feature_maps) == len(reference.feature_maps)
    for expected, feature_map in zip(reference.feature_maps, actual.feature_maps):
        assert relative_diff(expected, feature_map) <= tolerance


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    "fields",
    [
        slow_param(fields, id=name) if name in ("resnet50", "resnet18") else pytest.param(fields, id=name)
        for name, fields in CONFIGS.items()
    ],
)
def test_float32_matches_original(fields, memory_format, images):
    original = backbone(**fields)
    optimized = optimize_for_inference(original)
    pixel_values = images.contiguous(memory_format=memory_format)
    with torch.no_grad():
        reference, actual = original(pixel_values), optimized(pixel_values)
    assert_same_features(reference, actual, FLOAT32_TOLERANCE)
    assert all(feature_map.dtype == torch.float32 for feature_map in actual.feature_maps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "fields",
    [
        slow_param(CONFIGS["resnet50"], id="resnet50"),
        pytest.param(TINY_BASIC, id="basic"),
        pytest.param(GROUP_NORM, id="group"),
    ],
)
def test_low_precision_within_documented_tolerance_and_outputs_in_that_dtype(fields, dtype, images):
    original = backbone(**fields)
    optimized = optimize_for_inference(original, dtype=dtype)
    with torch.no_grad():
        reference = original(images)
        positional, keyword = optimized(images), optimized(pixel_values=images.to(memory_format=torch.channels_last))
    for actual in (positional, keyword):
        assert_same_features(reference, actual, LOW_PRECISION_TOLERANCE)
        assert all(feature_map.dtype == dtype for feature_map in actual.feature_maps)


def test_tuple_outputs_and_hidden_states_as_the_original(images):
    original = backbone(**TINY_BOTTLENECK)
    original.out_features = ["stage2", "stage4"]
    optimized = optimize_for_inference(original)
    with torch.no_grad():
        reference = original(images, output_hidden_states=True, return_dict=False)
        actual = optimized(images, output_hidden_states=True, return_dict=False)
    assert type(actual) is tuple and len(actual) == len(reference) == 2
    for expected_maps, actual_maps in zip(reference, actual):
        assert len(actual_maps) == len(expected_maps)
        for expected, feature_map in zip(expected_maps, actual_maps):
            assert relative_diff(expected, feature_map) <= FLOAT32_TOLERANCE
    assert (optimized.channels, optimized.strides) == (original.channels, original.strides) == ([128, 256], [8, 32])


@pytest.mark.parametrize("model_class", [ResNetModel, ResNetForImageClassification])
def test_models_with_heads_match_the_original(model_class, images):
    original = backbone(model_class, **TINY_BASIC)
    optimized = optimize_for_inference(original)
    with torch.no_grad():
        reference, actual = original(images), optimized(images)
    assert type(actual) is type(reference)
    for name in reference.keys():
        assert relative_diff(reference[name], actual[name]) <= FLOAT32_TOLERANCE


def test_callers_model_is_not_mutated_unless_inplace(images):
    original = backbone(**CONFIGS["deep-stem-avg-down-os8"]).train()
    state = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    module_types = [(name, type(module)) for name, module in original.named_modules()]
    optimize_for_inference(original, dtype=torch.bfloat16)
    assert [(name, type(module)) for name, module in original.named_modules()] == module_types
    assert original.training and all(parameter.requires_grad for parameter in original.parameters())
    assert original.state_dict().keys() == state.keys()
    for name, tensor in original.state_dict().items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name]), name
        assert tensor.is_contiguous(), name
    assert original(images).feature_maps[0].dtype == torch.float32

    in_place = optimize_for_inference(original, inplace=True)
    assert in_place is original and not original.training
    assert not any(isinstance(module, NORM_TYPES) for module in original.modules())


@pytest.mark.parametrize("norm_layer", ["batch", "frozen_batch", "sync_batch"])
def test_batch_norms_are_folded_away(norm_layer, images):
    original = backbone(**dict(TINY_BOTTLENECK, norm_layer=norm_layer, avg_down=True))
    optimized = optimize_for_inference(original)
    assert not any(isinstance(module, NORM_TYPES) for module in optimized.modules())
    convolutions = [module.convolution for module in optimized.modules() if isinstance(module, ConvLayer)]
    assert convolutions and all(convolution.bias is not None for convolution in convolutions)
    assert all(
        parameter.is_contiguous(memory_format=torch.channels_last)
        for parameter in optimized.parameters()
        if parameter.ndim == 4
    )
    with torch.no_grad():
        assert_same_features(original(images), optimized(images), FLOAT32_TOLERANCE)


def test_group_norm_is_kept_because_it_depends_on_the_input(images):
    original = backbone(**GROUP_NORM)
    optimized = optimize_for_inference(original, channels_last=False)
    assert sum(isinstance(module, nn.GroupNorm) for module in optimized.modules()) == sum(
        isinstance(module, nn.GroupNorm) for module in original.modules()
    )
    assert all(parameter.is_contiguous() for parameter in optimized.parameters())
    with torch.no_grad():
        assert_same_features(original(images), optimized(images), FLOAT32_TOLERANCE)


def test_a_norm_subclass_that_computes_more_than_the_affine_map_is_kept():
    """timm's BatchNormAct2d is an nn.BatchNorm2d whose forward also applies an activation: folding it into
    the convolution would drop the ReLU."""
    from timm.layers import BatchNormAct2d

    original = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU))).eval()
    optimized = optimize_for_inference(original, channels_last=False)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert isinstance(optimized[1], BatchNormAct2d) and max_abs_diff(original(images), optimized(images)) < 1e-5


def test_unsupported_models_dtypes_and_inputs_are_clear_errors():
    with pytest.raises(TypeError, match="takes a ResNetBackbone.*got str"):
        optimize_for_inference("resnet18")
    for nothing_to_optimise in (nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))):
        with pytest.raises(TypeError, match=r"nothing to optimise in .*no convolution\. It takes a ResNetBackbone"):
            optimize_for_inference(nothing_to_optimise)
    with pytest.raises(ValueError, match="dtype must be None or one of torch.float32, torch.bfloat16"):
        optimize_for_inference(backbone(**TINY_BASIC), dtype=torch.float64)
    optimized = optimize_for_inference(backbone(**TINY_BASIC), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="must be a floating point tensor, got dtype torch.uint8"):
        optimized(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be 4-D .* add the batch dimension"):
        optimized(torch.zeros(3, 32, 32))


@pytest.mark.slow
def test_compiled_fast_path_matches_original_for_both_memory_formats():
    with pytest.raises(TypeError, match="got OptimizedModule.*before any torch.compile"):
        optimize_for_inference(torch.compile(backbone(**TINY_BASIC)))
    original = backbone(**TINY_BASIC)
    optimized = optimize_for_inference(original, compile=True)
    assert type(optimized) is ResNetBackbone
    pixel_values = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        pixel_values = pixel_values.contiguous(memory_format=memory_format)
        with torch.no_grad():
            assert_same_features(original(pixel_values), optimized(pixel_values), FLOAT32_TOLERANCE)
    frozen = optimized(pixel_values).feature_maps[-1]
    optimized.encoder.stages[-1].layers[-1].layer[-1].convolution.weight.mul_(2)
    assert torch.equal(optimized(pixel_values).feature_maps[-1], frozen), "weights are constants, as documented"
    assert not torch._inductor.config.freezing, "freezing applies to this model's calls, not to the process"


@pytest.mark.slow
def test_the_compiled_fast_path_times_itself_against_its_uncompiled_twin_and_returns_the_compiled_outputs(
    monkeypatch,
):
    """Calls 2 to 4 of each input shape also run the uncompiled forward; whether that warns depends on the
    load of the machine, so only the outputs and the calls the check saw are asserted."""
    monkeypatch.delenv(CHECK_VARIABLE, raising=False)
    original = backbone(**TINY_BASIC)
    optimized, uncompiled = optimize_for_inference(original, compile=True), optimize_for_inference(original)
    check = optimized._compiled_call_impl
    assert isinstance(check, CompiledSpeedCheck)
    generator = torch.Generator().manual_seed(3)
    for size in (64, 96):
        pixel_values = torch.randn(1, 3, size, size, generator=generator)
        reference = uncompiled(pixel_values)
        for _ in range(CALLS_TIMED + 2):
            assert_same_features(reference, optimized(pixel_values), FLOAT32_TOLERANCE)
    assert check.warned or list(check.calls.values()) == [CALLS_TIMED + 2] * 2


def test_a_private_torch_api_that_changed_is_named_with_the_torch_version(monkeypatch):
    """As a torch release without it would: the one module that reaches private APIs says which and why."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    changed = rf"torch {re.escape(torch.__version__)} changed torch\.cpu\._is_amx_tile_supported, a private torch API"
    with pytest.raises(RuntimeError, match=changed + " that resnet_backbone needs to tell whether this CPU computes"):
        computes_bf16_natively("cpu")
    with pytest.raises(RuntimeError, match=r"changed torch\._inductor\.config\.no_such_setting"):
        compile_without_autograd(backbone(**TINY_BASIC), {"no_such_setting": True})
