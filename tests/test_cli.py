"""The `resnet-backbone` command line: each verb through ``main(argv)`` in this process (what the console
script calls), and the installed console script itself once."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import warnings

import onnx
import pytest
import timm
import torch
import torchvision
import transformers
from helpers import TINY_BASIC, max_abs_diff, randomize_norms
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from resnet_backbone import ResNetBackbone, ResNetConfig, ResNetModel
from resnet_backbone.cli.main import main


@pytest.fixture
def run_cli(capsys):
    """Run the command line with these arguments, as the console script does: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [line.split() for line in stdout.splitlines()[3:]]
    return {row[0]: row[1:] for row in rows if row and row[0].startswith(("stem", "stage"))}


@pytest.mark.slow
def test_info_reports_what_torchvision_resnet50_measures(run_cli):
    code, stdout, stderr = run_cli("info", "resnet50", "--input", "3x800x1333", "--out-features", "stage2", "stage4")
    assert code == 0, stderr
    table = _table(stdout)

    with torch.device("meta"):
        peer = torchvision.models.resnet50()
        stem = torch.nn.Sequential(peer.conv1, peer.bn1, peer.relu, peer.maxpool)
        modules = [stem, peer.layer1, peer.layer2, peer.layer3, peer.layer4]
        hidden = torch.empty(1, 3, 800, 1333)
        for name, module in zip(["stem", "stage1", "stage2", "stage3", "stage4"], modules):
            counter = FlopCounterMode(display=False)
            with counter:
                hidden = module(hidden)
            index, channels, stride, shape, params, gflops, *output = table[name]
            assert shape == "x".join(map(str, hidden.shape))
            assert int(channels) == hidden.shape[1] and int(stride) == 800 // hidden.shape[2]
            assert float(params) == pytest.approx(sum(p.numel() for p in module.parameters()) / 1e6, abs=0.006)
            assert float(gflops) == pytest.approx(counter.get_total_flops() / 1e9, abs=0.006)
            assert output == (["yes"] if name in ("stage2", "stage4") else [])
    assert "total" in stdout


def test_info_reads_a_config_json(tmp_path, run_cli):
    ResNetConfig.from_preset("resnet18", out_features=["stage3"]).to_json_file(tmp_path / "config.json")
    code, stdout, stderr = run_cli("info", str(tmp_path / "config.json"))
    assert code == 0, stderr
    table = _table(stdout)
    assert table["stage3"][1:3] == ["256", "16"] and table["stage3"][-1] == "yes"
    assert run_cli("info", str(tmp_path))[1] == stdout.replace(str(tmp_path / "config.json"), str(tmp_path))


@pytest.mark.slow
def test_the_installed_console_script_runs_a_verb_and_ends_an_error_with_exit_code_2():
    executable = shutil.which("resnet-backbone")
    assert executable, "the console script is not installed"
    result = subprocess.run([executable, "info", "resnet18"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "stage4" in result.stdout, result.stderr
    result = subprocess.run([executable, "info", "resnet5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Did you mean 'resnet50'" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "resnet5"], "Did you mean 'resnet50'"),
        (["info", "resnet18", "--out-features", "stage9"], "Valid stage_names"),
        (["info", "resnet18", "--input", "800x1333"], "CHANNELSxHEIGHTxWIDTH"),
        (["info", "missing/config.json"], "does not exist"),
    ],
)
def test_info_errors_are_short_and_actionable(args, message, run_cli):
    code, _, stderr = run_cli(*args)
    assert code == 2 and message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "resnet18", "--input", "3x0x64"], "CHANNELSxHEIGHTxWIDTH"),
        (["convert", "{tmp}/missing.safetensors", "{tmp}/out"], "does not exist"),
        (["convert", "{file}", "{tmp}/out"], "not a readable safetensors file"),
        (["convert", "{file}", "/nonexistent/folder/weights.pth", "--to", "torchvision"], "/nonexistent/folder"),
        (["demo", "--epochs", "0"], "expected an integer >= 1, got '0'"),
        (["demo", "--output-dir", "{file}/pictures"], "is a file, not a folder"),
        (["train", "--steps", "0"], "expected an integer >= 1, got '0'"),
        (["train", "--batch-size", "-2"], "expected an integer >= 1, got '-2'"),
        (["train", "--lr", "-1"], "expected a finite number >= 0, got '-1'"),
        (["train", "--data", "{tmp}/no-such-coco"], "expected an existing folder"),
        (["train", "--output-dir", "{file}"], "exists and is not a folder"),
        (["export-onnx", "resnet18", "/nonexistent/dir/o.onnx"], "the folder /nonexistent/dir does not exist"),
        (["export-onnx", "resnet18", "{tmp}"], "is a folder; expected a file path"),
        (["export-onnx", "resnet5", "{tmp}/o.onnx"], "Did you mean 'resnet50'"),
        (["export-onnx", "resnet18", "{file}"], "{file} already exists; pass --overwrite to replace it"),
        (["export-onnx", "resnet18", "{tmp}/o.onnx", "--opset", "11"],
         "ONNX opset 11 is not supported: the exporter writes opsets 16 to"),
        (["convert", "{tmp}/src", "{file}", "--to", "timm"], "{file} already exists; pass --overwrite to replace it"),
        (["convert", "{tmp}/src", "{tmp}"], "{tmp}/config.json already exists; pass --overwrite to replace it"),
        (["convert", "{tmp}/config.json", "{tmp}/out"],
         "{tmp}/config.json is a JSON file, not a checkpoint: expected a weights file "
         "(.safetensors/.bin/.pth/.pt/.ckpt) or a folder with config.json and model.safetensors"),
        (["convert", "{tmp}/folder", "{tmp}/out.pth", "--from", "timm", "--to", "timm"],
         "--from timm takes a timm model name (e.g. resnet50.a1_in1k) or a checkpoint file, got {tmp}/folder, a "
         "folder"),
    ],
)  # fmt: skip
def test_every_verb_ends_a_user_error_with_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    file = tmp_path / "bad.safetensors"
    file.write_bytes(b"not a checkpoint")
    ResNetConfig.from_preset("resnet18").to_json_file(tmp_path / "config.json")
    (tmp_path / "folder").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code = main([arg.format(tmp=tmp_path, file=file) for arg in args])
    error = capsys.readouterr().err
    message = message.format(tmp=tmp_path, file=file)
    assert code == 2 and message in error, error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert sorted(tmp_path.rglob("*")) == before  # nothing was written


def _reported_difference(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].rsplit(":", 1)[1])


@pytest.mark.slow
def test_convert_moves_weights_across_all_three_libraries(tmp_path, images, run_cli):
    peer = randomize_norms(torchvision.models.resnet18().eval())
    torch.save(peer.state_dict(), tmp_path / "torchvision.pth")
    with torch.no_grad():
        expected = peer(images)

    code, stdout, stderr = run_cli("convert", str(tmp_path / "torchvision.pth"), str(tmp_path / "hf"))
    assert code == 0, stderr
    assert "resnet18 (torchvision -> hf)" in stdout and _reported_difference(stdout) <= 1e-5
    theirs = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "hf").eval()

    code, _, stderr = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "timm.safetensors"), "--to", "timm")
    assert code == 0, stderr
    timm_model = timm.create_model("resnet18").eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)

    args = ["--from", "timm", "--to", "torchvision"]
    code, _, stderr = run_cli("convert", str(tmp_path / "timm.safetensors"), str(tmp_path / "back.pth"), *args)
    assert code == 0, stderr
    torchvision_model = torchvision.models.resnet18().eval()
    torchvision_model.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    with torch.no_grad():
        for logits in (theirs(images).logits, timm_model(images), torchvision_model(images)):
            assert max_abs_diff(logits, expected) <= 1e-5


@pytest.mark.slow
def test_convert_refuses_what_the_target_cannot_hold(tmp_path, run_cli):
    ResNetModel.from_preset("resnet50d").save_pretrained(tmp_path / "resnet50d")
    code, _, stderr = run_cli("convert", str(tmp_path / "resnet50d"), str(tmp_path / "out.pth"), "--to", "torchvision")
    assert code == 2 and "torchvision cannot represent resnet50d" in stderr
    assert not (tmp_path / "out.pth").exists()


def test_convert_replaces_an_earlier_output_only_with_overwrite(tmp_path, run_cli):
    tiny = {**TINY_BASIC, "embedding_size": 64}  # timm's stem is 64 wide
    ResNetModel(**tiny).save_pretrained(tmp_path / "source")
    ResNetModel(**tiny).save_pretrained(tmp_path / "hf")
    (tmp_path / "timm.safetensors").write_bytes(b"an earlier conversion")
    earlier = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for destination, target in [(tmp_path / "hf", "hf"), (tmp_path / "timm.safetensors", "timm")]:
        code, _, stderr = run_cli("convert", str(tmp_path / "source"), str(destination), "--to", target)
        existing = destination / "config.json" if target == "hf" else destination
        assert (code, stderr) == (2, f"resnet-backbone convert: error: {existing} already exists; pass --overwrite "
                                     f"to replace it\n")  # fmt: skip
    assert {path: path.read_bytes() for path in earlier} == earlier
    for destination, target in [(tmp_path / "hf", "hf"), (tmp_path / "timm.safetensors", "timm")]:
        code, _, stderr = run_cli("convert", str(tmp_path / "source"), str(destination), "--to", target, "--overwrite")
        assert code == 0, stderr
    assert load_file(tmp_path / "timm.safetensors")  # a checkpoint now, where the earlier bytes were
    source, replaced = (load_file(tmp_path / folder / "model.safetensors") for folder in ("source", "hf"))
    assert all(torch.equal(replaced[key], tensor) for key, tensor in source.items())


def test_export_onnx_refuses_to_replace_an_earlier_weights_data_file(tmp_path, run_cli):
    (tmp_path / "m.onnx.data").write_bytes(b"the weights of an earlier, large export")
    code, _, stderr = run_cli("export-onnx", "resnet18", str(tmp_path / "m.onnx"))
    assert (code, stderr) == (2, f"resnet-backbone export-onnx: error: {tmp_path / 'm.onnx.data'} already exists; "
                                 f"pass --overwrite to replace it\n")  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx.data"]


@pytest.mark.slow
def test_export_onnx_replaces_an_earlier_file_only_with_overwrite(tmp_path, run_cli):
    ResNetBackbone(**TINY_BASIC).save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    args = ["export-onnx", str(tmp_path / "checkpoint"), str(tmp_path / "m.onnx")]
    code, _, stderr = run_cli(*args)
    assert (code, stderr) == (2, f"resnet-backbone export-onnx: error: {tmp_path / 'm.onnx'} already exists; "
                                 f"pass --overwrite to replace it\n")  # fmt: skip
    assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export"
    code, _, stderr = run_cli(*args, "--overwrite")
    assert code == 0, stderr
    onnx.checker.check_model(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "m.onnx"]


@pytest.mark.parametrize(
    ("old_module", "new_module", "name"),
    [
        ("resnet_backbone.cli.deploy", "resnet_backbone.export", "export_onnx"),
        ("resnet_backbone.cli.deploy", "resnet_backbone.export", "dynamic_shapes"),
        ("resnet_backbone.cli.distributed", "resnet_backbone.distributed", "convert_sync_batchnorm"),
        ("resnet_backbone.cli.training", "resnet_backbone.training.engine", "TrainingOptions"),
    ],
)
def test_a_moved_name_still_imports_from_its_old_path_with_a_deprecation_warning(old_module, new_module, name):
    """Importing the old module is silent; using a moved name from it warns, names the new home, and gives the
    very object that lives there."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match=rf"{old_module}\.{name} moved to {new_module}\.{name}"):
        moved = getattr(old, name)
    assert moved is getattr(importlib.import_module(new_module), name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        old.no_such_name  # noqa: B018
