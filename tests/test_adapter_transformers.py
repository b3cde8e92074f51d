"""The transformers adapter inside transformers' own detection, segmentation and depth models (random
weights, randomised norm statistics, offline)."""

from __future__ import annotations

import json
import math
from typing import Any

import huggingface_hub.constants
import pytest
import timm
import torch
import transformers
from helpers import (
    TINY_BOTTLENECK,
    max_abs_diff,
    non_default_config_values,
    place_in_hub_cache,
    randomize_norms,
    run_python,
    slow_param,
)
from torch import nn
from transformers import (
    AutoBackbone,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    DPTConfig,
    DPTForDepthEstimation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    MaskFormerConfig,
    MaskFormerForInstanceSegmentation,
    RTDetrConfig,
    RTDetrForObjectDetection,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers import ResNetConfig as TransformersResNetConfigOfTransformers

import resnet_backbone.adapters.transformers as rbt
from resnet_backbone import FrozenBatchNorm2d, ResNetBackbone, ResNetConfig

STAGES_1_TO_4 = ["stage1", "stage2", "stage3", "stage4"]
# Each model with the smallest head its config allows, and the backbone stages it reads.
DETR_HEAD = dict(encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
                 encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5)  # fmt: skip
MODELS = {
    "detr": (DetrConfig, DetrForObjectDetection, ["stage4"], DETR_HEAD),
    "conditional_detr": (ConditionalDetrConfig, ConditionalDetrForObjectDetection, ["stage4"], DETR_HEAD),
    "deformable_detr": (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        ["stage2", "stage3", "stage4"],
        {**DETR_HEAD, "decoder_layers": 2, "decoder_n_points": 2, "encoder_n_points": 2},
    ),
    "mask2former": (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        STAGES_1_TO_4,
        dict(
            feature_size=32,
            mask_feature_size=32,
            hidden_dim=32,
            encoder_feedforward_dim=32,
            dim_feedforward=32,
            encoder_layers=1,
            decoder_layers=2,
            num_queries=5,
            num_attention_heads=2,
            train_num_points=256,  # the loss samples 12544 points per mask by default
        ),  # fmt: skip
    ),
    "maskformer": (
        MaskFormerConfig,
        MaskFormerForInstanceSegmentation,
        STAGES_1_TO_4,
        dict(
            fpn_feature_size=32,
            mask_feature_size=32,
            decoder_config=dict(
                model_type="detr",
                d_model=32,
                decoder_layers=1,
                decoder_ffn_dim=32,
                decoder_attention_heads=2,
                encoder_layers=1,
                num_queries=5,
            ),
        ),  # fmt: skip
    ),
    "upernet": (
        UperNetConfig,
        UperNetForSemanticSegmentation,
        STAGES_1_TO_4,
        dict(hidden_size=32, auxiliary_channels=16, num_labels=3),
    ),
    "dpt_hybrid": (
        DPTConfig,
        DPTForDepthEstimation,
        ["stage1", "stage2", "stage3"],
        # The hybrid's first two reassemble stages take stages 1 and 2 as they are: their widths are 64, 128.
        dict(
            is_hybrid=True,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=96,
            patch_size=16,
            backbone_out_indices=[0, 1, 0, 1],
            backbone_featmap_shape=[1, 192, 6, 6],
            neck_hidden_sizes=[64, 128, 64, 64],
            fusion_hidden_size=16,
        ),  # fmt: skip
    ),
    "rt_detr": (
        RTDetrConfig,
        RTDetrForObjectDetection,
        ["stage2", "stage3", "stage4"],
        dict(
            d_model=32,
            encoder_hidden_dim=32,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=5,
            hidden_expansion=0.5,
            decoder_in_channels=[32, 32, 32],
        ),  # fmt: skip
    ),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    """No test may reach the network: huggingface_hub refuses every request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def build(model_name: str, backbone: Any, **head_overrides: Any) -> nn.Module:
    config_class, model_class, _, head = MODELS[model_name]
    return model_class(config_class(backbone_config=backbone, **{**head, **head_overrides}))


def tensor_outputs(output: Any) -> dict[str, torch.Tensor]:
    return {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}


def small_images(height: int = 96, width: int = 96) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- config and registration


@pytest.mark.parametrize(("name", "value"), non_default_config_values().items(), ids=str)
def test_every_resnet_config_field_round_trips(name, value):
    config = ResNetConfig(**{name: value})
    converted = rbt.backbone_config(config)
    assert converted.to_resnet_config() == config
    reloaded = transformers.AutoConfig.for_model(**json.loads(converted.to_json_string()))
    assert type(reloaded) is rbt.TransformersResNetConfig and reloaded.to_resnet_config() == config
    assert (converted.stage_names, converted.out_indices) == (config.stage_names, config.out_indices)


def test_config_errors_are_resnet_configs():
    with pytest.raises(ValueError, match="Did you mean 'stage2'"):
        rbt.backbone_config("resnet50", out_features=["stag2"])
    with pytest.raises(ValueError, match="norm_layer"):
        rbt.backbone_config("resnet50", norm_layer="instance")
    neither = r"^'resnet5O' is neither a preset nor an existing path or Hub repo id\. Did you mean 'resnet50'\? "
    with pytest.raises(ValueError, match=neither + "Presets: resnet18, "):
        rbt.backbone_config("resnet5O")
    unknown = r"^Unknown ResNetConfig field 'out_featurs' \(did you mean 'out_features'\?\)\. Valid fields: "
    for source in ("resnet18", ResNetConfig.from_preset("resnet18")):
        with pytest.raises(ValueError, match=unknown):
            rbt.backbone_config(source, out_featurs=["stage2"])


def test_importing_again_registers_nothing_and_warns_nothing(recwarn):
    import importlib

    config_class = transformers.AutoConfig.for_model("resnet_backbone").__class__
    importlib.reload(rbt)
    assert transformers.AutoConfig.for_model("resnet_backbone").__class__ is config_class
    assert not recwarn.list


# ---------------------------------------------------------------- parity with transformers' own ResNet


@pytest.mark.parametrize("model_name", [name if name in ("detr", "upernet") else slow_param(name) for name in MODELS])
def test_model_on_our_backbone_equals_model_on_transformers_resnet(model_name):
    """Identical state-dict keys both ways, and identical outputs after loading theirs into ours."""
    out_features = MODELS[model_name][2]
    sizes = {} if model_name == "detr" else TINY_BOTTLENECK  # DETR at the real ResNet-50 sizes
    theirs = build(model_name, TransformersResNetConfigOfTransformers(out_features=out_features, **sizes))
    ours = build(model_name, rbt.backbone_config("resnet50", out_features=out_features, **sizes))
    assert type(rbt.find_backbone(ours)).__name__ == "TransformersResNetBackbone"
    randomize_norms(theirs)
    state_dict = theirs.state_dict()
    assert list(ours.state_dict()) == list(state_dict)
    ours.load_state_dict(state_dict, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = small_images()
    with torch.no_grad():
        expected, actual = (
            tensor_outputs(theirs.eval()(pixel_values=images)),
            tensor_outputs(ours.eval()(pixel_values=images)),
        )
    assert expected.keys() == actual.keys() and expected
    for name, value in expected.items():
        assert max_abs_diff(actual[name], value) <= 1e-5, name


# ---------------------------------------------------------------- beyond transformers' ResNet: train and predict

BEYOND = {
    "resnext50_32x4d, freeze_at=2": ("resnext50_32x4d", dict(freeze_at=2)),
    "resnet50d, frozen_batch": ("resnet50d", dict(norm_layer="frozen_batch")),
    "output_stride=16, norm_eval": ("resnet50", dict(output_stride=16, norm_eval=True)),
}


def training_targets(model_name: str, images: torch.Tensor) -> dict[str, Any]:
    batch, _, height, width = images.shape
    if model_name == "detr":
        target = dict(class_labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.3, 0.4]]))
        return dict(labels=[target] * batch)
    if model_name == "mask2former":
        mask = torch.zeros(1, height, width)
        mask[:, 10:40, 20:60] = 1
        return dict(mask_labels=[mask] * batch, class_labels=[torch.tensor([1])] * batch)
    return dict(labels=torch.randint(0, 3, (batch, height, width), generator=torch.Generator().manual_seed(4)))


def expected_frozen(model_name: str, config: rbt.TransformersResNetConfig) -> list[str]:
    """Stages whose parameters get no gradient: DETR freezes its whole ResNet backbone by parameter name
    (its pattern ``"stage.1"`` never matches ``stages.1``), as with transformers' own ResNet; the other
    models keep ours as configured."""
    return config.stage_names if model_name == "detr" else config.stage_names[: config.freeze_at]


def stage_of(parameter_name: str) -> str:
    if parameter_name.startswith("embedder."):
        return "stem"
    return f"stage{int(parameter_name.split('.')[2]) + 1}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BEYOND))
@pytest.mark.parametrize("model_name", ["detr", "mask2former", "upernet"])
def test_configs_beyond_transformers_resnet_train_and_predict(model_name, variant):
    preset, options = BEYOND[variant]
    config = rbt.backbone_config(preset, out_features=MODELS[model_name][2], **TINY_BOTTLENECK, **options)
    model = build(model_name, config)
    backbone = rbt.find_backbone(model)
    randomize_norms(backbone)
    images = torch.cat([small_images(), small_images().flip(-1)])  # UperNet's pooling branch needs a batch of 2
    model.train()
    kept_in_eval = config.stage_names if config.norm_eval else config.stage_names[: config.freeze_at]
    norms_before = {name: tensor.clone() for name, tensor in backbone.state_dict().items() if "running" in name}

    loss = model(pixel_values=images, **training_targets(model_name, images)).loss
    assert math.isfinite(loss.item())
    loss.backward()

    frozen = expected_frozen(model_name, config)
    for name, parameter in backbone.named_parameters():
        has_gradient = parameter.grad is not None and parameter.grad.abs().sum() > 0
        assert has_gradient == (stage_of(name) not in frozen), name
    for name, before in norms_before.items():
        unchanged = torch.equal(backbone.state_dict()[name], before)
        never_updated = model_name == "detr" or config.norm_layer == "frozen_batch"  # frozen norms, DETR's or ours
        assert unchanged == (stage_of(name) in kept_in_eval or never_updated), name
    if options.get("norm_layer") == "frozen_batch" and model_name != "detr":
        assert not any(isinstance(module, nn.BatchNorm2d) for module in backbone.modules())
        assert any(isinstance(module, FrozenBatchNorm2d) for module in backbone.modules())

    model.eval()
    with torch.no_grad():
        feature_maps = backbone(images).feature_maps
        prediction = tensor_outputs(model(pixel_values=images))
    expected_stride = 16 if config.output_stride == 16 else 32
    assert feature_maps[-1].shape[-2:] == (images.shape[-2] // expected_stride, images.shape[-1] // expected_stride)
    assert prediction and all(torch.isfinite(value).all() for value in prediction.values())


# ---------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A resnet50d-shaped checkpoint of this project (tiny widths, randomised norms) and its tensors."""
    directory = tmp_path_factory.mktemp("ours") / "resnet50d"
    torch.manual_seed(5)
    backbone = randomize_norms(ResNetBackbone.from_preset("resnet50d", **TINY_BOTTLENECK), seed=5)
    backbone.save_pretrained(directory)
    return str(directory), backbone.state_dict()


def assert_holds(backbone: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = backbone.state_dict()
    compared = [name for name in expected if not name.endswith("num_batches_tracked")]
    assert compared and all(torch.equal(actual[name], expected[name]) for name in compared)


def test_backbone_config_of_a_checkpoint_puts_its_weights_in_the_built_model(our_checkpoint):
    directory, expected = our_checkpoint
    config = rbt.backbone_config(directory, out_features=["stage4"])
    assert config.pretrained_weights == directory and config.stem_type == "deep"
    # transformers ignores use_pretrained_backbone; the weights come with the config either way.
    for use_pretrained_backbone in (True, False):
        detr = build("detr", config, use_pretrained_backbone=use_pretrained_backbone)
        assert_holds(rbt.find_backbone(detr), expected)  # after DETR's frozen-norm swap and its weight init
    upernet = build("upernet", rbt.backbone_config(directory, out_features=STAGES_1_TO_4))
    assert_holds(rbt.find_backbone(upernet), expected)


def test_a_checkpoint_that_is_not_there_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        rbt.backbone_config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither a local directory or file nor a Hub repo"):
        rbt.backbone_config("someone/not-in-the-cache")


def test_auto_backbone_loads_ours_and_transformers_checkpoints(our_checkpoint, tmp_path):
    directory, expected = our_checkpoint
    saved = AutoBackbone.from_config(rbt.backbone_config(directory, out_features=["stage2"]))
    saved.save_pretrained(tmp_path / "adapter")
    # transformers 5.24's AutoBackbone.from_pretrained asks the Hub whether a local directory is a repo
    # (for every backbone, its own ResNet too), so offline the class's own from_pretrained loads it.
    reloaded = rbt.TransformersResNetBackbone.from_pretrained(str(tmp_path / "adapter"))
    assert type(reloaded) is rbt.TransformersResNetBackbone and reloaded.out_features == ["stage2"]
    assert_holds(reloaded, expected)

    theirs = randomize_norms(transformers.ResNetBackbone(TransformersResNetConfigOfTransformers(**TINY_BOTTLENECK)))
    theirs.save_pretrained(tmp_path / "transformers")
    ours = AutoBackbone.from_config(rbt.backbone_config(str(tmp_path / "transformers"), out_features=["stage3"]))
    assert_holds(ours, theirs.state_dict())
    images = small_images()
    with torch.no_grad():
        expected_maps = theirs.eval()(images, output_hidden_states=True).hidden_states[3]
        assert max_abs_diff(ours.eval()(images).feature_maps[0], expected_maps) <= 1e-5


# ---------------------------------------------------------------- transformers' timm route


@pytest.mark.slow
def test_timm_route_builds_offline_and_takes_weights_by_the_documented_recipe(tmp_path):
    with torch.device("meta"):  # the offline build is the point here, not the weights
        backbone = AutoBackbone.from_config(TimmBackboneConfig(backbone="rb_resnet50", out_indices=[1, 2, 3, 4]))
        DetrForObjectDetection(DetrConfig(use_timm_backbone=True, backbone="rb_resnet50", **DETR_HEAD))
    assert backbone.channels == [256, 512, 1024, 2048]
    detr = DetrForObjectDetection(DetrConfig(use_timm_backbone=True, backbone="rb_resnet18", **DETR_HEAD))
    randomize_norms(ResNetBackbone.from_preset("resnet18"), seed=6).save_pretrained(tmp_path / "resnet18")

    # The README's recipe: DETR builds the timm backbone with random weights, so load them afterwards.
    weights = timm.create_model(
        "rb_resnet18",
        pretrained=True,
        features_only=True,
        out_indices=(1, 2, 3, 4),
        pretrained_cfg_overlay=dict(source="local-dir", file=str(tmp_path / "resnet18")),
    )
    detr.model.backbone.model.load_state_dict(weights.state_dict())

    assert_holds(detr.model.backbone.model, weights.state_dict())


# ---------------------------------------------------------------- fast path and a fresh process


def test_fast_path_on_the_backbone_of_a_built_model():
    detr = build("detr", rbt.backbone_config("resnet50", out_features=["stage4"], **TINY_BOTTLENECK)).eval()
    randomize_norms(detr)
    images = small_images()
    with torch.no_grad():
        expected = tensor_outputs(detr(pixel_values=images))
        backbone = rbt.optimize_backbone_for_inference(detr)
        actual = tensor_outputs(detr(pixel_values=images))
    assert backbone is detr.model.backbone.model
    assert not [module for module in backbone.modules() if "Norm" in type(module).__name__]  # all folded
    for name, value in expected.items():
        assert max_abs_diff(actual[name], value) <= 1e-4 * value.abs().max().item(), name


@pytest.mark.slow
def test_saved_models_and_hub_ids_load_in_a_fresh_offline_process_only_with_the_adapter(tmp_path):
    images = small_images()
    checks = {}
    for model_name, auto_class in [
        ("detr", "AutoModelForObjectDetection"),
        ("upernet", "AutoModelForSemanticSegmentation"),
    ]:
        config = rbt.backbone_config("resnext50_32x4d", out_features=MODELS[model_name][2], **TINY_BOTTLENECK)
        model = randomize_norms(build(model_name, config)).eval()
        model.save_pretrained(tmp_path / model_name)
        with torch.no_grad():
            checks[str(tmp_path / model_name)] = (auto_class, tensor_outputs(model(pixel_values=images)))
    # A transformers checkpoint under a Hub id, in the Hub cache: backbone_config takes the id offline.
    theirs = randomize_norms(transformers.ResNetBackbone(TransformersResNetConfigOfTransformers(**TINY_BOTTLENECK)))
    theirs.save_pretrained(tmp_path / "hub_model")
    files = {name: tmp_path / "hub_model" / name for name in ("config.json", "model.safetensors")}
    place_in_hub_cache(tmp_path / "hub", "someone/tiny-resnet", files)
    torch.save(dict(images=images, checks=checks, hub=theirs.state_dict()), tmp_path / "checks.pt")
    # One fresh interpreter: first without the adapter (transformers must refuse), then with it.
    reload = """
import sys, torch, transformers
saved = torch.load(sys.argv[1])
for with_adapter in (False, True):
    if with_adapter:
        import resnet_backbone.adapters.transformers
    for directory, (auto_class, expected) in saved["checks"].items():
        try:
            model = getattr(transformers, auto_class).from_pretrained(directory).eval()
        except Exception as error:
            print(f"{with_adapter}|{type(error).__name__}: {error}".replace(chr(10), " "))
            continue
        with torch.no_grad():
            output = model(pixel_values=saved["images"])
        print(f"{with_adapter}|{max((output[name] - value).abs().max().item() for name, value in expected.items())}")
config = resnet_backbone.adapters.transformers.backbone_config("someone/tiny-resnet", out_features=["stage4"])
backbone = transformers.AutoBackbone.from_config(config).state_dict()
print(all(torch.equal(backbone[name], value) for name, value in saved["hub"].items()))
"""
    environment = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    lines = run_python(reload, environment, [str(tmp_path / "checks.pt")]).stdout.strip().splitlines()
    without, with_adapter, hub_weights_loaded = lines[:2], lines[2:4], lines[4:]
    assert all(line.startswith("False|") and "resnet_backbone" in line for line in without), without
    # Another process may pick other kernels or thread splits, so float32 sums accumulate in another order:
    # the same weights give outputs equal to rounding, not to the bit.
    assert [line.split("|")[0] for line in with_adapter] == ["True", "True"], with_adapter
    assert all(float(line.split("|")[1]) < 1e-5 for line in with_adapter), with_adapter
    assert hub_weights_loaded == ["True"]


def test_detr_freezes_the_whole_resnet_as_with_transformers_own_and_freeze_restores_ours():
    """DETR's name-based freezing (pattern ``"stage.1"``) matches no parameter of either ResNet, so it freezes
    all of it; the trunk's ``freeze`` re-applies ``freeze_at`` afterwards."""
    for backbone_config in (
        TransformersResNetConfigOfTransformers(out_features=["stage4"], **TINY_BOTTLENECK),
        rbt.backbone_config("resnet50", out_features=["stage4"], freeze_at=2, **TINY_BOTTLENECK),
    ):
        backbone = build("detr", backbone_config).model.backbone.model
        assert not any(parameter.requires_grad for parameter in backbone.parameters())
    backbone.trunk.freeze(2)
    trainable = {stage_of(name) for name, parameter in backbone.named_parameters() if parameter.requires_grad}
    assert trainable == {"stage2", "stage3", "stage4"}
