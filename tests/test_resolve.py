"""One resolver says what a source named by text is (a preset, a file, a folder, a Hub repo id, a URL, a
torchvision weights name, a timm model name), and every entry point that takes such a source goes through it:
the same text means the same thing, and a bad source gets the same error, from each of them."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_BASIC, max_abs_diff, place_in_hub_cache

import resnet_backbone.adapters.transformers as rbt
from resnet_backbone import ResNetBackbone, ResNetModel
from resnet_backbone.adapters.torchvision import build_detector, build_segmenter, resnet_fpn_backbone
from resnet_backbone.cli.info import config_from_argument
from resnet_backbone.weights import Source, resolve_source


@pytest.fixture
def saved(tmp_path):
    """A tiny checkpoint folder (config.json + model.safetensors) and the model it holds."""
    model = ResNetModel(**TINY_BASIC).eval()
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved", model


def test_each_kind_of_source_is_told_apart(saved, tmp_path):
    folder, _ = saved
    weights = folder / "model.safetensors"
    place_in_hub_cache(tmp_path / "cache", "someone/tiny-resnet", {"model.safetensors": weights})
    assert resolve_source("resnet50") == Source("preset", "resnet50")
    assert resolve_source(folder) == Source("folder", str(folder))
    assert resolve_source(str(weights)) == Source("file", str(weights))
    assert resolve_source("someone/tiny-resnet") == Source("hub", "someone/tiny-resnet")
    assert resolve_source(weights.as_uri()) == Source("url", weights.as_uri())
    assert resolve_source("https://download.pytorch.org/models/resnet50-11ad3fa6.pth").kind == "url"
    assert resolve_source(Source("hub", "someone/tiny-resnet")) == Source("hub", "someone/tiny-resnet")
    # Where the caller reads them, names of torchvision weights and timm models.
    assert resolve_source("ResNet50_Weights.IMAGENET1K_V2", names="torchvision").kind == "torchvision_weights"
    assert resolve_source("resnet50.a1_in1k", names="timm") == Source("timm_name", "resnet50.a1_in1k")
    assert resolve_source(str(weights), names="timm").kind == "file"


def test_a_preset_name_wins_over_a_local_path_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    assert resolve_source("resnet18").kind == "preset"
    assert resolve_source("resnet18", names="timm").kind == "folder"


def test_a_hub_repo_id_in_the_hub_cache_loads_offline(saved, tmp_path):
    folder, model = saved
    files = {name: folder / name for name in ("config.json", "model.safetensors")}
    place_in_hub_cache(tmp_path / "cache", "someone/tiny-resnet", files)
    source = resolve_source("someone/tiny-resnet")
    loaded = ResNetModel.from_pretrained(source, cache_dir=tmp_path / "cache", local_files_only=True)
    assert loaded.config.depths == TINY_BASIC["depths"]
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in model.state_dict().items())


def test_a_url_downloads_once_into_torch_home_and_loads_from_every_entry_point(saved, tmp_path, monkeypatch, images):
    folder, model = saved
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    safetensors_url, pth_url = (folder / "model.safetensors").as_uri(), (tmp_path / "weights.pth").as_uri()
    with torch.no_grad():
        expected = model(images, output_hidden_states=True).hidden_states[-1]
    for load in (ResNetBackbone.load, ResNetBackbone.from_pretrained):
        with torch.no_grad():
            assert max_abs_diff(load(safetensors_url).eval()(images).feature_maps[-1], expected) <= 1e-6
    for load in (ResNetBackbone.from_torchvision, ResNetBackbone.from_timm):
        assert load(pth_url).config.depths == TINY_BASIC["depths"]
    cached = (tmp_path / "torch" / "hub" / "checkpoints").iterdir()
    assert sorted(path.name.split("-", 1)[1] for path in cached) == ["model.safetensors", "weights.pth"]
    # Read from the cache afterwards, also offline, with the original gone.
    (folder / "model.safetensors").unlink()
    assert ResNetBackbone.from_pretrained(safetensors_url, local_files_only=True).config.depths == TINY_BASIC["depths"]
    with pytest.raises(ValueError, match=r"^Could not download file:///nowhere/weights\.pth: "):
        ResNetBackbone.from_pretrained("file:///nowhere/weights.pth")
    with pytest.raises(ValueError, match="is not in the download cache .* and local_files_only is set"):
        ResNetBackbone.from_pretrained("file:///nowhere/weights.pth", local_files_only=True)


def test_two_urls_that_end_in_the_same_file_name_do_not_share_a_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name, config in (("small", TINY_BASIC), ("deeper", {**TINY_BASIC, "depths": [1, 2, 2, 1]})):
        ResNetModel(**config).save_pretrained(tmp_path / name)
        url = (tmp_path / name / "model.safetensors").as_uri()
        assert ResNetBackbone.from_pretrained(url).config.depths == config["depths"]


NEITHER = (
    "'resnet5O' is neither a preset nor an existing path or Hub repo id. Did you mean 'resnet50'? Presets: resnet18, "
)


def _entry_points():
    """Every entry point that takes a preset, a path, a Hub id or a URL by name."""
    return {
        "ResNetBackbone.load": ResNetBackbone.load,
        "ResNetModel.load": ResNetModel.load,
        "ResNetBackbone.from_pretrained": ResNetBackbone.from_pretrained,
        "backbone_config": rbt.backbone_config,
        "resnet_fpn_backbone": resnet_fpn_backbone,
        "build_detector": lambda source: build_detector("fasterrcnn", source),
        "build_segmenter": lambda source: build_segmenter("fcn", source),
        "RBResNet(pretrained=...)": _mmdet_pretrained,
        "resnet-backbone info": config_from_argument,
    }


def _mmdet_pretrained(source: str) -> None:
    from resnet_backbone.adapters.mmdet import RBResNet  # mmengine's registry takes a second to import

    RBResNet(depth=18, pretrained=source).init_weights()


@pytest.mark.parametrize("bad", ["resnet5O", "{tmp}/missing/model.safetensors", "./resnet50"])
def test_a_bad_source_gets_the_same_error_from_every_entry_point(tmp_path, bad):
    bad = bad.format(tmp=tmp_path)
    with pytest.raises(ValueError) as from_the_resolver:
        resolve_source(bad)
    errors = {}
    for name, entry_point in _entry_points().items():
        with pytest.raises(ValueError) as raised:
            entry_point(bad)
        errors[name] = str(raised.value)
    assert errors == dict.fromkeys(errors, str(from_the_resolver.value))
    if bad == "resnet5O":
        assert str(from_the_resolver.value).startswith(NEITHER)
    else:
        assert str(from_the_resolver.value) == f"{bad} does not exist."


def test_torchvision_and_timm_sources_name_what_they_take(tmp_path):
    with pytest.raises(ValueError, match=r"^'resnet5O' is neither an existing path, a URL nor a torchvision weights"):
        ResNetBackbone.from_torchvision("resnet5O")
    for load in (ResNetBackbone.from_torchvision, ResNetBackbone.from_timm):
        with pytest.raises(ValueError, match=r"missing\.pth does not exist\.$"):
            load(str(tmp_path / "missing.pth"))


def test_from_pretrained_says_a_preset_has_no_weights():
    with pytest.raises(ValueError, match=r"^'resnet50' is a preset, which has no weights: from_preset\('resnet50'\)"):
        ResNetBackbone.from_pretrained("resnet50")


def test_what_is_not_text_or_a_path_is_a_type_error():
    with pytest.raises(TypeError, match="^Expected a preset name, a checkpoint file or folder, a Hub repo id or a URL"):
        resolve_source(42)
