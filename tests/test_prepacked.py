"""Prepacked convolutions: the fast path's CPU convolutions run on weights reordered once for oneDNN, compute
what torch's own convolution computes, and step aside wherever the packed weight would be wrong or unusable."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TINY_BOTTLENECK, randomize_norms
from torch import nn

from resnet_backbone import ResNetBackbone, optimize_for_inference
from resnet_backbone.prepacked import PrepackedConv2d, prepack_convolutions
from resnet_backbone.torch_compat import onednn_convolution_ops

pytestmark = pytest.mark.skipif(onednn_convolution_ops() is None, reason="this torch build has no oneDNN")

GEOMETRIES = {
    "3x3": dict(kernel_size=3, padding=1),
    "strided 7x7": dict(kernel_size=7, stride=2, padding=3),
    "dilated grouped": dict(kernel_size=3, padding=2, dilation=2, groups=4),
    "1x1 without bias": dict(kernel_size=1, bias=False),
}


def seeded_convolution(**geometry) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(8, 16, **geometry).eval().requires_grad_(False)


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_computes_what_torchs_convolution_computes_at_every_input_size(geometry, memory_format):
    plain = seeded_convolution(**geometry).to(memory_format=torch.channels_last)
    prepacked = PrepackedConv2d.from_conv(copy.deepcopy(plain))
    with torch.inference_mode():
        for shape in [(1, 8, 31, 45), (3, 8, 16, 16), (2, 8, 9, 70)]:
            pixel_values = inputs(*shape).contiguous(memory_format=memory_format)
            expected, actual = plain(pixel_values), prepacked(pixel_values)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            assert actual.is_contiguous(memory_format=torch.channels_last)
    assert prepacked._packed is not None, "it ran on the packed weight"


def test_packs_once_and_again_only_when_the_weight_changes():
    prepacked = PrepackedConv2d.from_conv(seeded_convolution(kernel_size=3, padding=1))
    pixel_values = inputs(2, 8, 20, 20)
    with torch.no_grad():
        prepacked(pixel_values)
        packed = prepacked._packed
        prepacked(inputs(1, 8, 33, 17))
        assert prepacked._packed is packed, "a new input size reuses the packed weight"
        prepacked.weight.mul_(-2)
        expected = nn.functional.conv2d(pixel_values, prepacked.weight, prepacked.bias, padding=1)
        torch.testing.assert_close(prepacked(pixel_values), expected, rtol=1e-5, atol=1e-5)
        assert prepacked._packed is not packed
    prepacked.to(torch.bfloat16)
    with torch.no_grad():
        actual = prepacked(pixel_values.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-1)


def test_steps_aside_for_gradients_autocast_other_dtypes_and_tracing():
    prepacked = PrepackedConv2d.from_conv(seeded_convolution(kernel_size=3, padding=1))
    plain = seeded_convolution(kernel_size=3, padding=1)
    pixel_values = inputs(1, 8, 12, 12)
    needs_grad = pixel_values.clone().requires_grad_()
    prepacked(needs_grad).sum().backward()
    plain(needs_grad.detach().requires_grad_()).sum().backward()
    assert needs_grad.grad is not None and prepacked._packed is None, "autograd runs torch's convolution"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepacked(pixel_values).dtype == plain(pixel_values).dtype == torch.bfloat16
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="should be the same"):
            prepacked(pixel_values.double())  # torch's own error, not a packed weight of another dtype
        traced = torch.jit.trace(prepacked, pixel_values)
    assert "mkldnn" not in str(traced.graph)
    torch.testing.assert_close(traced(pixel_values), plain(pixel_values))


def test_copies_and_pickles_of_a_model_that_ran_pack_their_own(images):
    original = randomize_norms(ResNetBackbone(**TINY_BOTTLENECK, out_features=["stage2", "stage4"])).eval()
    optimized = optimize_for_inference(original)
    assert any(isinstance(module, PrepackedConv2d) for module in optimized.modules())
    with torch.no_grad():
        expected = optimized(images).feature_maps
        for twin in (copy.deepcopy(optimized), pickle.loads(pickle.dumps(optimized))):
            for reference, feature_map in zip(expected, twin(images).feature_maps):
                torch.testing.assert_close(feature_map, reference)


def test_only_plain_convolutions_are_replaced_and_the_state_dict_keeps_its_keys():
    class PaddedSame(nn.Conv2d):
        """A subclass with a forward of its own (as timm's Conv2dSame), which prepacking must not skip."""

    model = nn.Sequential(seeded_convolution(kernel_size=3, padding=1), PaddedSame(16, 4, 3), nn.ReLU())
    keys = list(model.state_dict())
    prepack_convolutions(model)
    assert [type(module) for module in model] == [PrepackedConv2d, PaddedSame, nn.ReLU]
    assert list(model.state_dict()) == keys
    unpacked = optimize_for_inference(nn.Sequential(seeded_convolution(kernel_size=1)), channels_last=False)
    assert type(unpacked[0]) is nn.Conv2d, "prepacking comes with channels_last"


@pytest.mark.slow
def test_compiling_and_exporting_a_prepacked_model_trace_torchs_convolution(images):
    original = randomize_norms(ResNetBackbone(**TINY_BOTTLENECK, out_features=["stage4"])).eval()
    optimized = optimize_for_inference(original)
    with torch.no_grad():
        expected = original(images).feature_maps[0]
        program = torch.export.export(optimized, (images,))
        assert not [node for node in program.graph.nodes if "mkldnn" in str(node.target)]
        torch.testing.assert_close(program.module()(images).feature_maps[0], expected, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(optimized, backend="aot_eager")
        torch.testing.assert_close(compiled(images).feature_maps[0], expected, rtol=1e-4, atol=1e-4)
