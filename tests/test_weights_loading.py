"""Loading is safe, strict and explicit; saving is atomic; downloads go through the real loaders (offline)."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
import torchvision
import transformers
from helpers import (
    ALL_STAGES,
    TINY_BASIC,
    TINY_BOTTLENECK,
    max_abs_diff,
    place_in_hub_cache,
    randomize_norms,
    run_python,
)
from safetensors.torch import save_file

from resnet_backbone import CheckpointMismatchError, ResNetBackbone, ResNetForImageClassification, ResNetModel
from resnet_backbone.weights import load_checkpoint, read_state_dict


def small_transformers_classifier(seed: int = 0) -> transformers.ResNetForImageClassification:
    config = transformers.ResNetConfig(**TINY_BASIC, num_labels=4)
    return randomize_norms(transformers.ResNetForImageClassification(config).eval(), seed=seed)


@pytest.mark.slow
def test_from_pretrained_reads_a_transformers_classifier_checkpoint_into_a_backbone(tmp_path, images):
    theirs = small_transformers_classifier()
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"Dropped the checkpoint's classifier \(classifier.1.bias"):
        backbone = ResNetBackbone.from_pretrained(tmp_path, out_features=["stage2", "stage3"]).eval()
    assert sorted(backbone.load_report.dropped_classifier_keys) == ["classifier.1.bias", "classifier.1.weight"]
    assert backbone.load_report.dropped_stage_keys and backbone.load_report.is_exact
    assert backbone.config.id2label == theirs.config.id2label
    with torch.no_grad():
        expected = theirs.resnet(images, output_hidden_states=True).hidden_states
        for mine, reference in zip(backbone(images).feature_maps, expected[2:4], strict=True):
            assert max_abs_diff(mine, reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["module.", "backbone.", "backbone.body.", "model.", "module.backbone.body."])
def test_wrapper_prefixes_and_containers_are_unwrapped(prefix, tmp_path, images):
    peer = randomize_norms(torchvision.models.resnet18().eval())
    wrapped = {"epoch": 3, "state_dict": {prefix + key: value for key, value in peer.state_dict().items()}}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    with pytest.warns(UserWarning, match="classifier"):
        backbone = ResNetBackbone.from_torchvision(tmp_path / "checkpoint.pth").eval()
    with torch.no_grad():
        assert max_abs_diff(backbone(images).feature_maps[0], peer.layer4(peer.layer3(peer.layer2(peer.layer1(
            peer.maxpool(peer.relu(peer.bn1(peer.conv1(images))))))))) <= 1e-5  # fmt: skip


@pytest.mark.slow
def test_strict_load_lists_every_problem_with_the_likely_cause_and_loads_nothing():
    model = ResNetBackbone.from_preset("resnet50", out_features=ALL_STAGES)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(model, torchvision.models.resnet18().state_dict())
    message = str(error.value)
    assert "this looks like a resnet18 checkpoint; the config is resnet50" in message
    assert "missing from the checkpoint" in message and "shape mismatch" in message
    assert error.value.report.missing_keys and error.value.report.mismatched_keys
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.slow
def test_unexpected_keys_are_listed_and_strict_false_loads_what_fits_with_a_report():
    state_dict = dict(torchvision.models.resnet18().state_dict(), **{"layer1.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="unexpected in the checkpoint: .*layer1.0.extra.weight"):
        ResNetBackbone.from_torchvision(state_dict)
    model = ResNetForImageClassification.from_preset("resnet18", num_labels=10)
    classifier_before = model.classifier[1].weight.clone()
    peer = torchvision.models.resnet18()
    report = load_checkpoint(model, peer.state_dict(), strict=False)
    assert [key for key, _, _ in report.mismatched_keys] == ["classifier.1.weight", "classifier.1.bias"]
    assert report.unexpected_keys == [] and report.missing_keys == []
    assert torch.equal(model.resnet.embedder.embedder.convolution.weight, peer.conv1.weight)
    assert torch.equal(model.classifier[1].weight, classifier_before)


@pytest.mark.slow
def test_a_classifier_with_another_label_count_says_how_to_fix_it():
    with pytest.raises(CheckpointMismatchError, match="classifier has 1000 labels and the config 10"):
        ResNetForImageClassification.from_torchvision(torchvision.models.resnet18(), num_labels=10)
    model = ResNetForImageClassification.from_torchvision(torchvision.models.resnet18(), num_labels=10, strict=False)
    assert len(model.load_report.mismatched_keys) == 2 and model.classifier[1].out_features == 10


def test_frozen_norms_take_statistics_and_eps_from_the_checkpoint(images):
    frozen_norm = partial(torchvision.ops.FrozenBatchNorm2d, eps=0.01)
    peer = randomize_norms(torchvision.models.resnet18(norm_layer=frozen_norm).eval())
    with pytest.warns(UserWarning, match="classifier"):
        ours = ResNetBackbone.from_torchvision(peer, norm_layer="frozen_batch", out_features=["stage3"]).train()
    assert {m.eps for m in ours.modules() if hasattr(m, "running_var")} == {0.01}
    with torch.no_grad():
        expected = peer.layer3(peer.layer2(peer.layer1(peer.maxpool(peer.relu(peer.bn1(peer.conv1(images)))))))
        assert torch.equal(ours(images).feature_maps[0], expected)  # torchvision's arithmetic, bit for bit


@pytest.mark.slow
def test_a_batch_norm_checkpoint_loads_strictly_into_frozen_norms_and_matches_eval_mode(images):
    peer = randomize_norms(torchvision.models.resnet18().eval())
    with pytest.warns(UserWarning, match="classifier"):
        frozen = ResNetBackbone.from_torchvision(peer, norm_layer="frozen_batch").train()
        batch = ResNetBackbone.from_torchvision(peer).eval()
    assert frozen.load_report.is_exact and "num_batches_tracked" in " ".join(peer.state_dict())
    with torch.no_grad():
        expected = batch(images).feature_maps[0]
        # x * scale + shift against the BatchNorm kernel: equal up to float32 rounding.
        assert max_abs_diff(frozen(images).feature_maps[0], expected) <= 1e-5 * expected.abs().max()


# ---------------------------------------------------------------- safety and damaged files


class _Payload:
    """Unpickling this would write a file: the proof that loading ran foreign code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as file:
        pickle.dump({"conv1.weight": torch.zeros(1), "evil": _Payload(str(marker))}, file, protocol=2)
    with pytest.raises(ValueError, match="Refusing to load .*pytorch_model.bin.*arbitrary code"):
        read_state_dict(path)
    (tmp_path / "config.json").write_text(ResNetModel(**TINY_BASIC).config.to_json_string())
    with pytest.raises(ValueError, match="Refusing"):
        ResNetModel.from_pretrained(tmp_path)
    assert not marker.exists()


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    save_file({"weight": torch.zeros(1000)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "model.safetensors")
    torch.save({"weight": torch.zeros(1000)}, tmp_path / "weights.pth")
    data = (tmp_path / "weights.pth").read_bytes()
    (tmp_path / "weights.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights.pth is not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "weights.pth")
    torch.save({"epoch": torch.tensor(1), "step": 5}, tmp_path / "trainer.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "trainer.pth")


def test_files_that_are_no_checkpoint_are_called_what_they_are(tmp_path):
    expected = "not a checkpoint: expected a weights file"
    ResNetModel(**TINY_BASIC).config.to_json_file(tmp_path / "config.json")
    for load in (read_state_dict, ResNetModel.from_pretrained):
        with pytest.raises(ValueError, match=f"config.json is a JSON file, {expected}"):
            load(tmp_path / "config.json")
    (tmp_path / "empty.bin").touch()
    with pytest.raises(ValueError, match=f"empty.bin is an empty file, {expected}"):
        read_state_dict(tmp_path / "empty.bin")
    (tmp_path / "notes.pth").write_text("weights are in the other folder")
    neither = "a file in neither safetensors' nor torch.save's format"
    with pytest.raises(ValueError, match=f"notes.pth is {neither}, {expected}"):
        read_state_dict(tmp_path / "notes.pth")
    with pytest.raises(ValueError, match="is a folder, not a checkpoint file: expected a weights file"):
        read_state_dict(tmp_path)


def test_bad_directories_and_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no weights: expected model.safetensors or pytorch_model.bin"):
        ResNetBackbone.from_pretrained(tmp_path)
    ResNetModel(**TINY_BASIC).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ResNetModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    with pytest.raises(ValueError, match="model of type 'convnext'"):
        ResNetModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ResNetModel.from_pretrained(tmp_path / "missing" / "model.safetensors")


def test_a_weights_file_without_config_loads_with_the_inferred_architecture(tmp_path, images):
    theirs = small_transformers_classifier()
    save_file(theirs.state_dict(), tmp_path / "model.safetensors")
    ours = ResNetForImageClassification.from_pretrained(tmp_path / "model.safetensors").eval()
    with torch.no_grad():
        assert max_abs_diff(ours(images).logits, theirs(images).logits) <= 1e-5


# ---------------------------------------------------------------- atomic saving

_INTERRUPTED_SAVE = """
import resource, signal, sys
from resnet_backbone import ResNetModel
model = ResNetModel.from_preset("resnet18")
if sys.argv[2] == "killed":
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: over-limit writes then fail with OSError
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the weights file stops growing at 1 MiB
model.save_pretrained(sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["killed", "error"])
def test_an_interrupted_save_keeps_the_previous_checkpoint_whole(interruption, tmp_path, images):
    previous = randomize_norms(ResNetModel(**TINY_BOTTLENECK).eval())
    previous.save_pretrained(tmp_path)
    files_before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    result = subprocess.run([sys.executable, "-c", _INTERRUPTED_SAVE, str(tmp_path), interruption], timeout=120)
    assert result.returncode != 0
    if interruption == "killed":
        assert result.returncode == -signal.SIGXFSZ
    files_after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert {name: files_after[name] for name in files_before} == files_before
    leftovers = set(files_after) - set(files_before)
    # A killed writer cannot clean up: what it leaves is a hidden temporary, never a checkpoint name.
    assert not leftovers if interruption == "error" else all(name.startswith(".") for name in leftovers)
    reloaded = ResNetModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images).last_hidden_state, previous(images).last_hidden_state)
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY


# ---------------------------------------------------------------- downloads, offline


@pytest.mark.slow
def test_a_hub_repo_id_loads_through_the_hub_cache_with_hf_hub_offline(tmp_path, images):
    theirs = small_transformers_classifier(seed=2)
    theirs.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    place_in_hub_cache(cache, "microsoft/resnet-50", {
        "config.json": tmp_path / "saved" / "config.json",
        "model.safetensors": tmp_path / "saved" / "model.safetensors",
    })  # fmt: skip
    torch.save(images, tmp_path / "images.pt")
    run_python(
        "import sys, torch\n"
        "from resnet_backbone import ResNetBackbone\n"
        "backbone = ResNetBackbone.from_pretrained('microsoft/resnet-50', out_features=['stage1', 'stage4']).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(backbone(torch.load(sys.argv[1])).feature_maps, sys.argv[2])\n",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONWARNINGS": "ignore"},
        args=[str(tmp_path / "images.pt"), str(tmp_path / "features.pt")],
    )
    with torch.no_grad():
        expected = theirs.resnet(images, output_hidden_states=True).hidden_states
    actual = torch.load(tmp_path / "features.pt")
    assert max_abs_diff(actual[0], expected[1]) <= 1e-5 and max_abs_diff(actual[1], expected[4]) <= 1e-5


def test_hub_options_are_passed_through(tmp_path):
    theirs = small_transformers_classifier()
    theirs.save_pretrained(tmp_path / "saved")
    files = {name: tmp_path / "saved" / name for name in ("config.json", "model.safetensors")}
    place_in_hub_cache(tmp_path / "cache", "someone/tiny-resnet", files)
    with pytest.warns(UserWarning, match="classifier"):
        model = ResNetModel.from_pretrained("someone/tiny-resnet", cache_dir=tmp_path / "cache", local_files_only=True)
    assert model.config.depths == TINY_BASIC["depths"]
    with pytest.raises(ValueError, match="nobody/nothing"):
        ResNetModel.from_pretrained("nobody/nothing", cache_dir=tmp_path / "cache", local_files_only=True)


@pytest.mark.slow
def test_a_torchvision_weights_enum_loads_through_torchvision_and_torch_home(tmp_path, monkeypatch, images):
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    peer = randomize_norms(torchvision.models.resnet50().eval())
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(peer.state_dict(), checkpoints / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for source in (weights, "ResNet50_Weights.IMAGENET1K_V2"):
        model = ResNetForImageClassification.from_torchvision(source).eval()
        assert model.config.id2label[0] == weights.meta["categories"][0]
        with torch.no_grad():
            assert max_abs_diff(model(images).logits, peer(images)) <= 1e-5


@pytest.mark.slow
def test_a_timm_pretrained_tag_loads_through_timm_and_the_hub_cache(tmp_path, images):
    import timm

    peer = randomize_norms(timm.create_model("resnet18").eval())
    save_file(peer.state_dict(), tmp_path / "model.safetensors")
    cache = tmp_path / "hub"
    place_in_hub_cache(cache, "timm/resnet18.a1_in1k", {"model.safetensors": tmp_path / "model.safetensors"})
    torch.save(images, tmp_path / "images.pt")
    run_python(
        "import sys, torch\n"
        "from resnet_backbone import ResNetForImageClassification\n"
        "model = ResNetForImageClassification.from_timm('resnet18.a1_in1k').eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[1])).logits, sys.argv[2])\n",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
        args=[str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
    )
    with torch.no_grad():
        assert max_abs_diff(torch.load(tmp_path / "logits.pt"), peer(images)) <= 1e-5
