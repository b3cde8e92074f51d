"""Deployment: torch.compile, torch.export, ONNX (onnxruntime), TorchScript, mixed precision, channels_last."""

from __future__ import annotations

import shutil
import subprocess

import onnx
import onnxruntime
import pytest
import torch
from helpers import ALL_STAGES, TINY_BASIC, TINY_BOTTLENECK, max_abs_diff, randomize_norms

from resnet_backbone import BackboneOutput, ResNetBackbone, export
from resnet_backbone.adapters.torchvision import ResNetBody, resnet_fpn_backbone
from resnet_backbone.export import dynamic_shapes, export_onnx

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_backbone(**overrides) -> ResNetBackbone:
    return randomize_norms(ResNetBackbone(**{**TINY_BASIC, "out_features": ["stage1", "stage3"], **overrides}).eval())


def _close(first: BackboneOutput, second: BackboneOutput, tolerance: float) -> bool:
    return all(
        max_abs_diff(a, b) <= tolerance * max(1.0, b.abs().max().item())
        for a, b in zip(first.feature_maps, second.feature_maps, strict=True)
    )


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward_match_eager():
    torch._dynamo.reset()
    backbone = ResNetBackbone(**TINY_BASIC, out_features=["stage2", "stage4"]).train()
    compiled = torch.compile(backbone, fullgraph=True)
    images = torch.randn(2, 3, 64, 64)
    eager_out = backbone(images)
    sum(f.square().mean() for f in eager_out.feature_maps).backward()
    eager_grads = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    compiled_out = compiled(images)
    sum(f.square().mean() for f in compiled_out.feature_maps).backward()
    assert isinstance(compiled_out, BackboneOutput) and _close(compiled_out, eager_out, 1e-4)
    for eager, compiled_grad in zip(eager_grads, (p.grad for p in backbone.parameters()), strict=True):
        assert max_abs_diff(compiled_grad, eager) <= 1e-4 * max(1.0, eager.abs().max().item())


@pytest.mark.slow
def test_compile_dynamic_over_batch_and_size_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backbone = tiny_backbone()
    compiled = torch.compile(backbone, fullgraph=True, dynamic=True)
    with torch.no_grad():
        # torch.compile specialises sizes 0 and 1, and equal sizes seen first ("duck sizing"): so batches
        # start at 2 and the first image is not square.
        for batch, height, width in [(2, 64, 96), (3, 96, 128), (4, 160, 64)]:
            images = torch.randn(batch, 3, height, width)
            assert _close(compiled(images), backbone(images), 1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- torch.export


@pytest.mark.slow
def test_export_with_dynamic_batch_height_and_width_gives_the_same_feature_maps():
    backbone = tiny_backbone(layer_type="bottleneck", hidden_sizes=TINY_BOTTLENECK["hidden_sizes"])
    program = torch.export.export(backbone, (torch.randn(2, 3, 64, 96),), dynamic_shapes=dynamic_shapes(backbone))
    exported = program.module()
    with torch.no_grad():
        for batch, height, width in [(1, 32, 32), (3, 128, 64), (2, 96, 160)]:
            images = torch.randn(batch, 3, height, width)
            output = exported(images)
            assert isinstance(output, BackboneOutput) and _close(output, backbone(images), 1e-5)


@pytest.mark.slow
def test_export_accepts_hand_written_dynamic_shapes_and_dilated_backbones():
    backbone = tiny_backbone(output_stride=8)
    height, width = torch.export.Dim("h", min=1, max=32), torch.export.Dim("w", min=1, max=32)
    shapes = {"pixel_values": {0: torch.export.Dim("batch", max=16), 2: 8 * height, 3: 8 * width}}
    program = torch.export.export(backbone, (torch.randn(2, 3, 64, 64),), dynamic_shapes=shapes)
    images = torch.randn(1, 3, 40, 72)
    with torch.no_grad():
        assert _close(program.module()(images), backbone(images), 1e-5)


# ---------------------------------------------------------------- ONNX


def _run_onnx(path, images: torch.Tensor) -> list:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": images.numpy()})


@pytest.mark.slow
def test_onnx_export_is_one_self_contained_file_with_named_dynamic_outputs_that_onnxruntime_matches(tmp_path):
    backbone = tiny_backbone()
    (tmp_path / "export").mkdir()
    export_onnx(backbone, tmp_path / "export" / "backbone.onnx")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["backbone.onnx"]  # no data file, nothing hidden
    path = shutil.move(tmp_path / "export" / "backbone.onnx", tmp_path / "moved.onnx")  # it works alone
    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ["stage1", "stage3"] and graph.input[0].name == "pixel_values"
    assert all(not dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim if dim.dim_param)
    for size in [(1, 3, 64, 96), (3, 3, 160, 128)]:
        images = torch.randn(*size)
        with torch.no_grad():
            expected = backbone(images).feature_maps
        for actual, reference in zip(_run_onnx(path, images), expected, strict=True):
            assert max_abs_diff(torch.from_numpy(actual), reference) <= 1e-4


@pytest.mark.slow
def test_weights_too_large_to_embed_go_to_a_data_file_named_after_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 0)  # a model over 2 GB, without building one
    backbone = tiny_backbone()
    (tmp_path / "export").mkdir()
    export_onnx(backbone, tmp_path / "export" / "backbone.onnx")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["backbone.onnx", "backbone.onnx.data"]
    shutil.move(tmp_path / "export", tmp_path / "moved")
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = backbone(images).feature_maps
    for actual, reference in zip(_run_onnx(tmp_path / "moved" / "backbone.onnx", images), expected, strict=True):
        assert max_abs_diff(torch.from_numpy(actual), reference) <= 1e-4


@pytest.mark.slow
def test_a_failed_onnx_export_leaves_nothing_behind(tmp_path):
    (tmp_path / "backbone.onnx").mkdir()  # the export runs, then cannot be renamed into place
    (tmp_path / "backbone.onnx" / "kept").write_text("mine")
    with pytest.raises(IsADirectoryError):
        export_onnx(tiny_backbone(), tmp_path / "backbone.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.onnx"]
    assert [p.name for p in (tmp_path / "backbone.onnx").iterdir()] == ["kept"]


@pytest.mark.slow
@pytest.mark.parametrize("opset", [export.LOWEST_OPSET, 20])
def test_onnx_export_writes_the_opset_asked_for(tmp_path, opset):
    backbone = tiny_backbone()
    path = export_onnx(backbone, tmp_path / "backbone.onnx", opset=opset)
    assert [(op.domain, op.version) for op in onnx.load(path).opset_import] == [("", opset)]
    assert export.onnx_max_abs_diff(path, backbone, [(1, 64, 96)]) <= 1e-4


@pytest.mark.parametrize("opset", [3, 11, export.LOWEST_OPSET - 1, onnx.defs.onnx_opset_version() + 1])
def test_an_opset_the_exporter_cannot_write_is_refused_before_exporting(tmp_path, opset):
    supported = f"opsets {export.LOWEST_OPSET} to {onnx.defs.onnx_opset_version()}"
    with pytest.raises(ValueError, match=f"ONNX opset {opset} is not supported: the exporter writes {supported}"):
        export_onnx(tiny_backbone(), tmp_path / "backbone.onnx", opset=opset)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_onnx_export_of_the_torchvision_fpn_backbone(tmp_path):
    fpn = resnet_fpn_backbone(tiny_backbone(out_features=ALL_STAGES[1:])).eval()
    path = export_onnx(fpn, tmp_path / "fpn.onnx")
    assert [o.name for o in onnx.load(path).graph.output] == ["0", "1", "2", "3", "pool"]
    for size in [(1, 3, 64, 64), (2, 3, 96, 160)]:
        images = torch.randn(*size)
        with torch.no_grad():
            expected = list(fpn(images).values())
        for actual, reference in zip(_run_onnx(path, images), expected, strict=True):
            assert max_abs_diff(torch.from_numpy(actual), reference) <= 1e-4


@pytest.mark.slow
def test_export_onnx_command_line(tmp_path):
    ResNetBackbone(**TINY_BASIC).save_pretrained(tmp_path / "checkpoint")
    command = [shutil.which("resnet-backbone"), "export-onnx", str(tmp_path / "checkpoint"), str(tmp_path / "m.onnx"),
               "--out-features", "stage2", "stage4", "--opset", "18"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = onnx.load(tmp_path / "m.onnx")
    assert [o.name for o in model.graph.output] == ["stage2", "stage4"]
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18
    difference = float(result.stdout.strip().rsplit(" ", 1)[1])
    assert difference <= 1e-4
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- TorchScript


@pytest.mark.slow
def test_the_torchvision_body_scripts_saves_and_reloads_with_identical_outputs(tmp_path):
    body = ResNetBody(tiny_backbone())
    scripted = torch.jit.script(body)
    scripted.save(tmp_path / "body.pt")
    reloaded = torch.jit.load(tmp_path / "body.pt")
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = body(images)
        for name, feature in reloaded(images).items():
            # TorchScript's executor may fuse or reorder float operations: equal up to rounding, not bit for bit.
            torch.testing.assert_close(feature, expected[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- precision and memory format


def test_bf16_autocast_on_cpu_is_finite_and_close_to_float32():
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = backbone(images)
    for low, full in zip(actual.feature_maps, expected.feature_maps, strict=True):
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        assert max_abs_diff(low, full) <= 0.05 * full.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_batch_norm_follows_the_input_dtype(dtype):
    backbone = tiny_backbone(norm_layer="frozen_batch").to(dtype)
    output = backbone(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert all(f.dtype == dtype for f in output.feature_maps)


def test_channels_last_inputs_and_weights_give_channels_last_features():
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone(images)
        backbone = backbone.to(memory_format=torch.channels_last)
        actual = backbone(images.to(memory_format=torch.channels_last))
    for feature in actual.feature_maps:
        assert feature.is_contiguous(memory_format=torch.channels_last)
    assert _close(actual, expected, 1e-5)


# ---------------------------------------------------------------- CUDA (runs where a GPU is present)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mixed_precision_forward_and_backward(dtype):
    backbone = tiny_backbone().cuda()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = backbone(images)
    with torch.autocast("cuda", dtype=dtype):
        actual = backbone.train()(images)
    sum(f.float().mean() for f in actual.feature_maps).backward()
    for low, full in zip(actual.feature_maps, expected.feature_maps, strict=True):
        assert torch.isfinite(low).all() and low.dtype == dtype
        assert max_abs_diff(low, full) <= 0.05 * full.abs().max()


@requires_cuda
def test_cuda_compile_and_export():
    torch._dynamo.reset()
    backbone = tiny_backbone().cuda()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        assert _close(torch.compile(backbone, fullgraph=True)(images), backbone(images), 1e-3)
        program = torch.export.export(backbone, (images,), dynamic_shapes=dynamic_shapes(backbone))
        assert _close(program.module()(images), backbone(images), 1e-4)


@requires_cuda
def test_cuda_channels_last_and_frozen_half_precision():
    backbone = tiny_backbone(norm_layer="frozen_batch").cuda().half().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
    with torch.no_grad():
        output = backbone(images)
    assert all(
        f.dtype == torch.half and f.is_contiguous(memory_format=torch.channels_last) for f in output.feature_maps
    )
