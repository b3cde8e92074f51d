"""Fine-tuning on the user's own folders: COCO files as labelling tools export them, instance and semantic
masks, augmentation that keeps targets right, evaluation, and the errors a wrong folder gives."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BAR, SIZES, SQUARE, TINY_BOTTLENECK
from PIL import Image
from pycocotools import mask as coco_mask
from torch import nn

from resnet_backbone import ResNetBackbone, ResNetConfig
from resnet_backbone.adapters.torchvision import build_detector, detection_loss
from resnet_backbone.cli.evaluate import run as evaluation_run
from resnet_backbone.cli.main import main
from resnet_backbone.training.data.augmentation import detection_transforms
from resnet_backbone.training.data.coco import CocoFolder
from resnet_backbone.training.data.masks import IGNORE_INDEX, MaskFolder
from resnet_backbone.training.data.synthetic import collate_detection
from resnet_backbone.training.evaluation import evaluate
from resnet_backbone.training.task_model import (
    IMAGE_POOLING_SEGMENTERS,
    SEGMENTERS,
    TaskSpec,
    build_task_model,
    load_task_model,
)

TINY_RUN = ["--image-size", "64", "--batch-size", "2", "--precision", "fp32", "--steps", "2", "--eval-every", "1"]


def test_a_real_coco_folder_is_cleaned_as_torchvision_references_do(folders):
    coco, _ = folders
    dataset = CocoFolder(coco, masks=True)
    assert (
        str(dataset.report)
        == "ignored 1 crowd box, dropped 1 degenerate box, 1 image without annotations kept as a negative"
    )
    assert dataset.id2label == {0: "background", 1: "square", 2: "bar"}
    image, negative = dataset[1]
    assert image.shape == (3, 48, 80) and negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    assert negative["masks"].shape == (0, 48, 80)
    image, target = dataset[3]  # 64 high, 96 wide: the box at x 70..110 is clipped to the border
    assert target["labels"].tolist() == [1, 2, 2]
    assert target["boxes"][2].tolist() == [70, 40, 96, 60]
    masks = target["masks"]
    assert masks.shape == (3, 64, 96) and masks.dtype == torch.uint8
    assert masks[0].sum() == (96 // 3) * (64 // 3)  # the polygon, decoded by pycocotools
    evaluation = CocoFolder(coco, keep_crowd=True, categories=dataset.categories)
    _, crowded = evaluation[2]
    assert crowded["iscrowd"].tolist() == [0, 0, 1] and crowded["boxes"][2].tolist() == [2, 30, 30, 44]


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["fcos", "maskrcnn"])
def test_the_detectors_train_on_a_negative_image_and_past_a_zero_width_box(folders, detector):
    dataset = CocoFolder(folders[0], masks=detector == "maskrcnn")
    model = build_detector(detector, "resnet18", num_classes=dataset.num_classes, min_size=64, max_size=64)
    batch = collate_detection([dataset[0], dataset[1]])  # image 0 had the zero-width box, image 1 has no annotation
    loss = detection_loss(model.train(), batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_augmentation_moves_boxes_and_masks_together(folders):
    coco, _ = folders
    dataset = CocoFolder(coco, masks=True, transforms=detection_transforms(64, augment=True))
    flipped = 0
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = dataset[0]
        assert image.shape == (3, 64, 64)
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, columns = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
            from_mask = torch.tensor([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])
            assert (box - from_mask).abs().max() <= 1.5, (seed, box, from_mask)
        flipped += bool(len(target["labels"]) and target["boxes"][0, 0] > 32)  # the square starts on the right
    assert flipped, "no draw flipped the image"


def _edited(coco, tmp_path, edit) -> str:
    copy = tmp_path / "edited"
    shutil.copytree(coco, copy)
    data = json.loads((copy / "annotations.json").read_text())
    edit(data, copy)
    (copy / "annotations.json").write_text(json.dumps(data))
    return str(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda data, _: data.pop("images"), "expected a list under 'images'"),
        (lambda data, _: data["annotations"][2].update(bbox=[1, 2, 3]), "annotations[2] (id 3): bbox must be 4"),
        (lambda data, _: data["annotations"][0].pop("category_id"), "annotations[0] (id 1): missing 'category_id'"),
        (lambda data, copy: (copy / "images" / "4.png").unlink(), "images[4]: the image file"),
        (lambda data, _: data["annotations"][0].update(category_id=5), "category_id 5 is not a category (3, 7)"),
        (lambda data, _: data.update(categories=[]), "'categories' is empty, so there is nothing to detect"),
        (lambda data, copy: _truncated_jpeg(data, copy, 4), "images[4] (id 4): "),
        (lambda data, copy: _corrupt_png(copy / "images" / "5.png"), "images[5] (id 5): "),
    ],
    ids=[
        "no-images",
        "three-number-box",
        "missing-key",
        "missing-file",
        "unknown-category",
        "no-categories",
        "truncated-jpeg",
        "corrupt-png",
    ],
)
def test_an_invalid_coco_folder_is_one_clear_error_that_writes_nothing(folders, tmp_path, capsys, edit, message):
    data = _edited(folders[0], tmp_path, edit)
    output = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--data", data, "--output-dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert message in error and "annotations.json" in error and error.count("\n") == 1
    assert not output.exists()


def _truncated_jpeg(data: dict, copy: Path, index: int) -> None:
    """Image ``index`` as a real JPEG cut in half: its header (and so its size) still reads."""
    path = copy / "images" / f"{index}.jpg"
    Image.open(copy / "images" / f"{index}.png").save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    data["images"][index]["file_name"] = path.name
    assert Image.open(path).size and "truncated" in _decode_error(path)


def _corrupt_png(path: Path) -> None:
    """Zeros over the middle of the compressed pixels: the header reads, decoding fails."""
    content = bytearray(path.read_bytes())
    start = content.index(b"IDAT") + 20
    content[start : start + 64] = bytes(64)
    path.write_bytes(bytes(content))
    assert Image.open(path).size and _decode_error(path)


def _decode_error(path: Path) -> str:
    try:
        Image.open(path).load()
    except Exception as error:
        return str(error)
    return ""


def _rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


def _mask_of(box: list[int], height: int, width: int) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([], "the segmentation is empty"),
        ([[10, 10, 20, 10]], "a polygon needs 3 or more x, y points (an even count of 6 or more numbers), got 4"),
        ([[]], "a polygon needs 3 or more x, y points"),
        ({"size": [64, 64], "counts": "0k1"}, "the RLE's size [64, 64] is not its image's [height, width] [48, 80]"),
        ({"size": [48, 80], "counts": [100, 20]}, "the RLE's runs cover 120 pixels, not the image's 48x80 = 3840"),
        ({"size": [48, 80], "counts": "~~"}, "the RLE's counts are neither COCO's compressed string"),
    ],
    ids=["empty", "two-points", "empty-polygon", "rle-size", "rle-runs", "rle-string"],
)
def test_maskrcnn_refuses_a_segmentation_it_cannot_decode_before_training(folders, tmp_path, capsys, segmentation,
                                                                          message):  # fmt: skip
    def add_annotation(data: dict, _) -> None:
        data["annotations"].append({"id": 99, "image_id": 1, "category_id": SQUARE, "bbox": [10, 10, 20, 20],
                                    "iscrowd": 0, "segmentation": segmentation})  # fmt: skip

    data = _edited(folders[0], tmp_path, add_annotation)
    output = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--detector", "maskrcnn", "--data", data, "--output-dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "annotations.json: annotations[" in error, error
    assert "(id 99) on image_id 1: " + message in error, error
    assert not output.exists()


def test_maskrcnn_takes_polygons_and_both_kinds_of_rle_on_any_image(folders, tmp_path):
    """Valid messy annotations stay valid: RLE (compressed and not) on a negative image, crowd RLE."""
    bar = [8, 20, 40, 30]  # on image 1: 48 high, 80 wide

    def add_rle(data: dict, _) -> None:
        mask = _mask_of(bar, 48, 80)
        runs = [int(run) for run in _run_lengths(mask)]
        for index, segmentation in enumerate([_rle(mask), {"size": [48, 80], "counts": runs}]):
            data["annotations"].append({"id": 90 + index, "image_id": 1, "category_id": BAR, "bbox": [8, 20, 32, 10],
                                        "iscrowd": 0, "segmentation": segmentation})  # fmt: skip

    dataset = CocoFolder(_edited(folders[0], tmp_path, add_rle), masks=True)
    _, target = dataset[1]
    assert target["labels"].tolist() == [2, 2]
    for mask in target["masks"]:
        assert torch.equal(mask, torch.from_numpy(_mask_of(bar, 48, 80)))


def _run_lengths(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts: alternating runs of 0 and 1 in column-major order, starting with 0s."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def test_an_invalid_mask_folder_is_one_clear_error_that_writes_nothing(folders, tmp_path, capsys):
    semantic = tmp_path / "semantic"
    shutil.copytree(folders[1], semantic)
    output = tmp_path / "run"
    args = ["train", *TINY_RUN, "--task", "segmentation", "--data", str(semantic), "--output-dir", str(output)]
    assert main([*args, "--num-classes", "2"]) == 2
    assert (
        "masks: class ids beyond the 2 classes (ids 0..1, and 255 = ignore): 2 in 0.png, 2.png, 3.png and 2 more"
        in capsys.readouterr().err
    )
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(semantic / "masks" / "2.png")
    assert main(args) == 2
    assert "masks/2.png is 10x10 (HxW) but its image" in capsys.readouterr().err
    (semantic / "masks" / "2.png").unlink()
    assert main(args) == 2
    assert "images/2.png has no mask" in capsys.readouterr().err
    assert not output.exists()


def test_a_stray_class_id_is_refused_naming_its_masks_and_the_ids_are_reported(folders, tmp_path, capsys):
    semantic = tmp_path / "semantic"
    shutil.copytree(folders[1], semantic)
    dataset = MaskFolder(semantic)
    pixels = dataset.class_pixels
    assert list(pixels) == [0, 1, 2, IGNORE_INDEX] and sum(pixels.values()) == sum(h * w for h, w in SIZES)
    assert pixels[IGNORE_INDEX] == sum(3 * width for _, width in SIZES)  # the unlabelled border
    assert dataset.report == (
        f"3 classes (from the masks); pixels per class id: 0: {pixels[0]}, 1: {pixels[1]}, 2: {pixels[2]}, "
        f"255 (ignored): {pixels[IGNORE_INDEX]}"
    )
    mask = np.array(Image.open(semantic / "masks" / "3.png"))
    mask[40, 40] = 254
    Image.fromarray(mask).save(semantic / "masks" / "3.png")
    args = [
        "train",
        *TINY_RUN,
        "--task",
        "segmentation",
        "--data",
        str(semantic),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "masks: the class ids [0, 1, 2, 254] have a gap (no mask holds 3): 254 in 3.png. Fix those masks" in error
    assert main([*args, "--num-classes", "3"]) == 2
    assert "beyond the 3 classes (ids 0..2, and 255 = ignore): 254 in 3.png." in capsys.readouterr().err
    assert MaskFolder(semantic, num_classes=255).num_classes == 255


@pytest.mark.parametrize("damage", [_corrupt_png, lambda path: path.write_bytes(path.read_bytes()[:200])],
                         ids=["corrupt", "truncated"])  # fmt: skip
def test_a_broken_image_in_the_validation_folder_is_refused_after_reporting_the_classes(folders, tmp_path, capsys,
                                                                                        damage):  # fmt: skip
    validation = tmp_path / "validation"
    shutil.copytree(folders[1], validation)
    damage(validation / "images" / "2.png")
    output = tmp_path / "run"
    args = ["--task", "segmentation", "--data", str(folders[1]), "--val-data", str(validation)]
    assert main(["train", *TINY_RUN, *args, "--output-dir", str(output)]) == 2
    captured = capsys.readouterr()
    assert "masks: 3 classes (from the masks); pixels per class id: 0: " in captured.out
    assert (
        f"the image of {validation / 'masks' / '2.png'}: {validation / 'images' / '2.png'} is not an image PIL can "
        "decode" in captured.err
    )
    assert captured.err.count("\n") == 1 and not output.exists()


def test_a_segmenter_with_image_pooling_is_refused_at_batch_size_one(capsys, tmp_path):
    args = ["train", *TINY_RUN, "--task", "segmentation", "--segmenter", "deeplabv3plus", "--batch-size", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        "resnet-backbone train: error: --batch-size 1: deeplabv3plus's ASPP image pooling uses BatchNorm on one value "
        "per channel, which cannot train; use --batch-size 2 or more (or --sync-bn over 2+ processes).\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("segmenter", SEGMENTERS)
def test_the_segmenters_declared_with_image_pooling_are_those_that_cannot_train_on_one_image(segmenter):
    spec = TaskSpec("segmentation", segmenter, 3, 64, {0: "a", 1: "b", 2: "c"})
    model = build_task_model(spec, "resnet18").train()
    images = torch.rand(1, 3, 64, 64)
    if segmenter in IMAGE_POOLING_SEGMENTERS:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model(images)
        assert model(images.expand(2, -1, -1, -1)).shape == (2, 3, 64, 64)
    else:
        assert model(images).shape == (1, 3, 64, 64)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _other_weights(directory: Path) -> None:
    spec = TaskSpec(**{**json.loads((directory / "task.json").read_text()), "id2label": {0: "a", 1: "b", 2: "c"}})
    torch.save(build_task_model(spec, ResNetBackbone(ResNetConfig(**TINY_BOTTLENECK))).state_dict(),
               directory / "task_model.pt")  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _edit_json(d / "task.json", lambda data: data.update(num_clases=3)),
         "task.json: unknown key 'num_clases'; a task.json holds task, architecture, num_classes, image_size, "
         "id2label, category_ids, out_features. Did you mean 'num_classes'?"),
        (lambda d: (d / "task.json").write_text((d / "task.json").read_text().replace('"detection",', '"detection"')),
         "task.json is not valid JSON: Expecting ',' delimiter at line 3, column 3."),
        (lambda d: _edit_json(d / "task.json", lambda data: data.pop("image_size")),
         "task.json: the key 'image_size' is missing"),
        (lambda d: _edit_json(d / "task.json", lambda data: data.update(architecture="unet")),
         'task.json: architecture is "unet", expected a detection architecture: fasterrcnn, '),
        (lambda d: _edit_json(d / "config.json", lambda data: data.update(depths=[1, 1, 1, 1])),
         "task_model.pt does not fit the fcos with backbone "),
        (lambda d: _edit_json(d / "config.json", lambda data: data.update(depths=[1, 1, 1])),
         "config.json: depths and hidden_sizes must have one entry per stage"),
        (_other_weights, "task_model.pt does not fit the fcos with backbone "),
        (lambda d: (d / "task_model.pt").write_bytes((d / "task_model.pt").read_bytes()[:1000]),
         "task_model.pt is not a state dict torch.load can read"),
    ],
    ids=["extra-key", "syntax-error", "missing-key", "wrong-architecture", "edited-depths", "edited-stages",
         "other-weights", "truncated-weights"],
)  # fmt: skip
def test_evaluate_names_the_file_that_does_not_fit_the_saved_model(saved_detector, folders, tmp_path, capsys, damage,
                                                                   message):  # fmt: skip
    directory = tmp_path / "model"
    shutil.copytree(saved_detector, directory)
    damage(directory)
    assert main(["evaluate", str(directory), "--data", str(folders[0] / "val")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"resnet-backbone evaluate: error: {directory}") and error.count("\n") == 1, error
    assert message in error, error


def test_an_unedited_saved_model_loads_whole(saved_detector):
    model, spec = load_task_model(saved_detector)
    saved = torch.load(saved_detector / "task_model.pt", weights_only=True)
    assert spec.architecture == "fcos" and spec.id2label == {0: "background", 1: "square", 2: "bar"}
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_evaluate_refuses_a_directory_that_is_no_fine_tuned_model(folders, tmp_path, capsys):
    ResNetBackbone.from_preset("resnet18").save_pretrained(tmp_path / "backbone")
    assert main(["evaluate", str(tmp_path / "backbone"), "--data", str(folders[0])]) == 2
    assert "is not a fine-tuned model directory" in capsys.readouterr().err


def _metrics(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


class _Oracle(nn.Module):
    """A stand-in detector that predicts the ground truth, plus a confident box on every crowd region."""

    def __init__(self, dataset: CocoFolder) -> None:
        super().__init__()
        self.targets = [dataset[index][1] for index in range(len(dataset))]
        self.calls = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        target = self.targets[self.calls]
        self.calls += 1
        return [{"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}]


@pytest.mark.slow
def test_detection_metrics_follow_the_coco_protocol_for_crowd_regions(folders):
    coco, _ = folders
    dataset = CocoFolder(coco, keep_crowd=True)
    spec = TaskSpec("detection", "fcos", dataset.num_classes, 64, dataset.id2label, [SQUARE, BAR])
    perfect = evaluate(_Oracle(dataset), dataset, spec, torch.device("cpu"))
    assert perfect == {"mAP@0.5": 1.0, "mAP": 1.0}  # the detection on the crowd region is no false positive
    without_crowd = CocoFolder(coco)  # not flagged as crowd, the region's detection is a false positive
    assert evaluate(_Oracle(dataset), without_crowd, spec, torch.device("cpu"))["mAP"] < 1.0


class _SegmentationOracle(nn.Module):
    """Logits that put each pixel in the class of its mask, and class 0 on the ignored pixels."""

    def __init__(self, dataset: MaskFolder) -> None:
        super().__init__()
        self.masks = [dataset[index][1] for index in range(len(dataset))]
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.calls].clone()
        self.calls += 1
        mask[mask == IGNORE_INDEX] = 0
        logits = F.one_hot(mask, 3).permute(2, 0, 1)[None].float()
        return F.interpolate(logits, size=images.shape[-2:], mode="nearest")


@pytest.mark.slow
def test_segmentation_metrics_ignore_255_and_report_every_class(folders):
    _, semantic = folders
    dataset = MaskFolder(semantic)
    spec = TaskSpec("segmentation", "unet", dataset.num_classes, 64, dataset.id2label)
    metrics = evaluate(_SegmentationOracle(dataset), dataset, spec, torch.device("cpu"))
    assert metrics["per_class_IoU"].keys() == {"0", "1", "2"}
    assert metrics["mIoU"] > 0.9 and all(iou > 0.85 for iou in metrics["per_class_IoU"].values())


def _train_and_evaluate(output, *args: str) -> list[dict]:
    """Train, then check the metrics log and that ``evaluate best/`` reproduces the best line."""
    assert main(["train", *TINY_RUN, *args, "--output-dir", str(output)]) == 0
    lines = _metrics(output)
    key = "mAP" if "mAP" in lines[0] else "mIoU"
    assert all(0 <= line[name] <= 1 for line in lines for name in line if name in ("mAP", "mAP@0.5", "mIoU"))
    best = max(lines, key=lambda line: line[key])
    data = args[args.index("--val-data") + 1]
    assert evaluation_run(argparse.Namespace(model=output / "best", data=Path(data))) == {
        name: value for name, value in best.items() if name != "step"
    }
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["fasterrcnn", "maskrcnn"])  # fcos: the torchrun test below
def test_the_rcnn_detectors_train_on_the_coco_folder_and_evaluate(folders, tmp_path, detector):
    coco, _ = folders
    args = ["--detector", detector, "--data", str(coco), "--val-data", str(coco / "val"), "--steps", "1"]
    assert [line["step"] for line in _train_and_evaluate(tmp_path, *args)] == [1]


@pytest.mark.slow
def test_segmentation_trains_on_the_mask_folder_and_evaluates(folders, tmp_path):
    _, semantic = folders
    lines = _train_and_evaluate(
        tmp_path, "--task", "segmentation", "--data", str(semantic), "--val-data", str(semantic)
    )
    assert lines[-1]["per_class_IoU"].keys() == {"0", "1", "2"}


@pytest.mark.slow
def test_ddp_evaluates_on_rank_zero_with_the_numbers_of_one_process(folders, tmp_path):
    coco, _ = folders
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "resnet_backbone.cli", "train", *TINY_RUN, "--batch-size", "1",
        "--data", str(coco), "--val-data", str(coco / "val"), "--output-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    cleaning = "ignored 1 crowd box, dropped 1 degenerate box, 1 image without annotations kept as a negative"
    assert result.stdout.count(cleaning) == 1 and "(identical)" in result.stdout
    lines = _metrics(tmp_path)
    assert [line["step"] for line in lines] == [1, 2]  # written once, by rank 0
    assert all(0 <= line[key] <= 1 for line in lines for key in ("mAP@0.5", "mAP"))
    assert f"step 2: mAP@0.5 {lines[1]['mAP@0.5']:.4f}, mAP {lines[1]['mAP']:.4f}" in result.stdout
    alone = evaluation_run(argparse.Namespace(model=tmp_path / "model", data=coco / "val"))
    # Scores computed in another process may differ in the last bits (float32 accumulation order).
    assert alone == pytest.approx({"mAP@0.5": lines[-1]["mAP@0.5"], "mAP": lines[-1]["mAP"]}, abs=1e-6)
    assert (tmp_path / "best" / "task_model.pt").is_file()
    backbone = ResNetBackbone.from_pretrained(tmp_path / "model")
    assert backbone.config.id2label == {0: "background", 1: "square", 2: "bar"}
