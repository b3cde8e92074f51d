"""Fine-tuned models in int8: their accuracy against float32 after real fine-tuning, ``resnet-backbone quantize``
end to end (its folder read back by ``evaluate``), and the errors it gives before doing any work.

The accuracy tests quantize with ``compile=False``: the uncompiled int8 programs compute the same int8
arithmetic (simulated in float32) and skip inductor's minutes of compiling; the CLI test runs the compiled path.
"""

from __future__ import annotations

import shutil

import pytest

from resnet_backbone import ResNetBackbone
from resnet_backbone.cli.main import build_parser, main
from resnet_backbone.quantization import MANIFEST_NAME, quantized_programs
from resnet_backbone.training.data.coco import BACKGROUND
from resnet_backbone.training.data.synthetic import SHAPE_CLASSES, SyntheticSegmentation
from resnet_backbone.training.demo import DemoOptions, fine_tune_demo_detector
from resnet_backbone.training.engine import TrainingOptions, distributed_world, fit
from resnet_backbone.training.quantized_model import compare_float_and_int8, quantize_task_model
from resnet_backbone.training.task_model import (
    INT8_DIR,
    TaskSpec,
    build_task_model,
    load_task_model,
    segmentation_loss,
)

SHAPE_LABELS = {0: BACKGROUND, **dict(enumerate(SHAPE_CLASSES, 1))}
CALIBRATION_IMAGES = 16


@pytest.mark.slow
def test_the_demo_detector_keeps_its_map50_in_int8():
    options = DemoOptions(epochs=3, train_images=256, eval_images=32, image_size=96)
    tuned = fine_tune_demo_detector(options, log=lambda line: None)
    spec = TaskSpec("detection", "fcos", len(SHAPE_LABELS), options.image_size, SHAPE_LABELS)
    int8_model = quantize_task_model(tuned.model, spec, tuned.train_set, CALIBRATION_IMAGES, compile=False)
    compared = compare_float_and_int8(tuned.model, int8_model, spec, tuned.eval_set)
    assert compared["float32"]["mAP@0.5"] > 0.25  # a detector that has learnt something to lose (0.34 measured)
    assert compared["int8"]["mAP@0.5"] == pytest.approx(compared["float32"]["mAP@0.5"], abs=0.02)


@pytest.mark.slow
def test_a_segmenter_fine_tuned_on_the_synthetic_masks_keeps_its_miou_in_int8():
    size = 64
    spec = TaskSpec("segmentation", "unet", len(SHAPE_LABELS), size, SHAPE_LABELS)
    model = build_task_model(spec, "resnet18")
    # A short warm-up: the default (50 steps) would take most of this short run.
    options = TrainingOptions(steps=60, learning_rate=3e-3, warmup_steps=5, show_progress=False)
    with distributed_world() as world:
        fit(model, SyntheticSegmentation(128, size=size, seed=0), segmentation_loss, options, world)
    calibration = SyntheticSegmentation(CALIBRATION_IMAGES, size=size, seed=0)
    int8_model = quantize_task_model(model, spec, calibration, CALIBRATION_IMAGES, compile=False)
    compared = compare_float_and_int8(model, int8_model, spec, SyntheticSegmentation(32, size=size, seed=1))
    # Above the 0.24 of predicting the background everywhere: the segmenter has learnt shapes (0.35 measured).
    assert compared["float32"]["mIoU"] > 0.3
    assert compared["int8"]["mIoU"] == pytest.approx(compared["float32"]["mIoU"], abs=0.01)


def _quantize(*args: str):  # noqa: ANN202  (what the verb's run returns)
    """Run the quantize verb as the console script parses it, returning what its ``run`` returns."""
    parsed = build_parser().parse_args(["quantize", *args])
    return parsed.run(parsed)


@pytest.mark.slow
def test_quantize_writes_a_folder_that_evaluate_runs_in_int8(saved_detector, folders, tmp_path, capsys):
    coco, _ = folders
    model_dir = tmp_path / "best"
    shutil.copytree(saved_detector, model_dir)
    compared = _quantize(
        str(model_dir), "--data", str(coco), "--calibration-images", "4", "--val-data", str(coco / "val")
    )
    output = tmp_path / "best-int8"
    printed = capsys.readouterr().out
    assert f"wrote the int8 fcos to {output} (calibrated on 4 images)" in printed
    assert compared.keys() == {"float32", "int8"} and compared["int8"].keys() == {"mAP", "mAP@0.5"}
    difference = compared["int8"]["mAP"] - compared["float32"]["mAP"]
    assert f"mAP      {compared['float32']['mAP']:.4f}   {compared['int8']['mAP']:.4f}  {difference:+.4f}" in printed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best", "best-int8"]  # no staging folder left
    assert {path.name for path in model_dir.iterdir()} < {path.name for path in output.iterdir()}
    assert (output / INT8_DIR / MANIFEST_NAME).is_file()

    assert main(["evaluate", str(output), "--data", str(coco / "val")]) == 0
    evaluated = capsys.readouterr().out
    assert f"mAP@0.5 {compared['int8']['mAP@0.5']:.4f}, mAP {compared['int8']['mAP']:.4f}" in evaluated
    int8_model, spec = load_task_model(output)
    assert set(quantized_programs(int8_model)) == {"backbone.body", "backbone.fpn", "head"}
    assert spec == load_task_model(model_dir)[1]
    with pytest.raises(RuntimeError, match="An int8 model runs inference only"):
        int8_model.train()

    assert _quantize(str(model_dir), "--data", str(coco), "--calibration-images", "1", "--overwrite") is None
    assert (output / INT8_DIR / MANIFEST_NAME).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best", "best-int8"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{model}", "--data", "{coco}", "--calibration-images", "7"],
         "7 calibration images asked for, but {coco} holds 6; pass a number from 1 to 6."),
        (["{model}", "--data", "{coco}", "--calibration-images", "0"],
         "argument --calibration-images: expected an integer >= 1, got '0'"),
        (["{model}", "--data", "{coco}", "--calibration-images", "2", "--output", "{tmp}/taken"],
         "{tmp}/taken already exists; pass --overwrite to replace it"),
        (["{model}", "--data", "{coco}", "--calibration-images", "2", "--output", "{model}", "--overwrite"],
         "--output {model} is MODEL_DIR itself; the int8 model is written to a folder of its own."),
        (["{tmp}/backbone", "--data", "{coco}", "--calibration-images", "2"],
         "{tmp}/backbone is not a fine-tuned model directory (such as train's OUTPUT_DIR/model or OUTPUT_DIR/best)"),
        (["{tmp}/quantized", "--data", "{coco}", "--calibration-images", "2"],
         "{tmp}/quantized is already an int8 model (it holds int8/); quantize the float model folder it was made "
         "from."),
        (["{model}", "--data", "{semantic}", "--calibration-images", "2"],
         "{semantic} must hold annotations.json and an images/ folder (COCO layout)."),
        (["{model}", "--data", "{tmp}/missing", "--calibration-images", "2"],
         "argument --data: expected an existing folder, got '{tmp}/missing' (it does not exist)"),
    ],
    ids=["too-many-images", "no-images", "existing-output", "output-is-input", "not-a-task-model",
         "already-int8", "data-of-another-task", "missing-data"],
)  # fmt: skip
def test_quantize_refuses_bad_input_before_any_work(saved_detector, folders, tmp_path, capsys, args, message):
    coco, semantic = folders
    ResNetBackbone.from_preset("resnet18", depths=[1, 1, 1, 1]).save_pretrained(tmp_path / "backbone")
    shutil.copytree(saved_detector, tmp_path / "quantized")
    (tmp_path / "quantized" / INT8_DIR).mkdir()
    (tmp_path / "taken").mkdir()
    before = sorted(tmp_path.rglob("*"))
    fields = dict(model=saved_detector, coco=coco, semantic=semantic, tmp=tmp_path)
    assert main(["quantize", *(arg.format(**fields) for arg in args)]) == 2
    error = capsys.readouterr().err
    assert message.format(**fields) in error and error.count("\n") == 1, error
    assert sorted(tmp_path.rglob("*")) == before
    assert not saved_detector.with_name("model-int8").exists()
