"""Whole detectors and segmenters: this project's models (``build_detector``, ``build_segmenter``, smp with a
``tu-rb_`` encoder) against the peer's own model with the same weights, in inference and a fine-tuning step.

Every case's outputs are checked against the peer's eager float32 model before anything is timed: the same
detections (boxes to 1e-3 of the image scale, the same labels), the same logits, the same loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection, segmentation
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from tqdm import tqdm

import resnet_backbone.adapters.timm  # noqa: F401  (registers the tu-rb_ encoders with timm)
from resnet_backbone import (
    ResNetBackbone,
    compile_for_training,
    dense_parts,
    optimize_for_inference,
)
from resnet_backbone.adapters.torchvision import (
    build_detector,
    build_segmenter,
    detection_loss,
    load_torchvision_weights,
)
from resnet_backbone.inference import compile_for_inference
from resnet_backbone.weights import to_canonical

from .agreement import Agreement, checked_min_cosine
from .compiled import find_slow_compiled, first_call
from .counters import count_flops, peak_memory_bytes
from .machine import matmul_runs
from .modes import LOW_PRECISION_MIN_COSINE, calibration_inputs, min_cosine_for, tolerance_for, why_not_run
from .parts import recorded_outputs, time_parts
from .peers import OURS
from .results import WorkloadResult
from .timing import time_interleaved
from .workloads import case_results

TASKS = ("detection", "segmentation", "finetune")


@dataclass(frozen=True)
class DenseMode:
    name: str
    fast_path: bool = False  # ours: optimize_for_inference (inference) or compile_for_training (fine-tuning)
    channels_last: bool = False
    compile: bool = False
    dtype: torch.dtype = torch.float32


EAGER = DenseMode("eager fp32")
PEER_INFERENCE_MODES = (
    EAGER,
    DenseMode("channels_last fp32", channels_last=True),
    # The peers' best float32: channels_last and each dense part compiled with inductor's freezing.
    DenseMode("channels_last compiled frozen fp32", channels_last=True, compile=True),
)
OUR_INFERENCE_MODES = (
    EAGER,
    DenseMode("fast path fp32", fast_path=True, channels_last=True),
    DenseMode("fast path fp32 compiled", fast_path=True, channels_last=True, compile=True),
    DenseMode("fast path bf16 compiled", fast_path=True, channels_last=True, compile=True, dtype=torch.bfloat16),
    DenseMode("fast path int8 compiled", fast_path=True, channels_last=True, compile=True, dtype=torch.int8),
)
FINETUNE_MODES = (EAGER, DenseMode("compiled channels_last", fast_path=True, channels_last=True, compile=True))


@dataclass(frozen=True)
class DenseWorkload:
    task: str  # one of TASKS
    model: str  # fasterrcnn, retinanet, fcos, deeplabv3, unet
    batch: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.task} {self.batch}x3x{self.height}x{self.width}"


# The sizes these models run at in practice: torchvision's default 800-pixel resize, its segmentation size,
# smp's usual crop.
DEFAULT_WORKLOADS = (
    DenseWorkload("detection", "fasterrcnn", 1, 800, 1216),
    DenseWorkload("detection", "retinanet", 1, 800, 1216),
    DenseWorkload("segmentation", "deeplabv3", 1, 520, 520),
    DenseWorkload("segmentation", "unet", 1, 512, 512),
    DenseWorkload("finetune", "fcos", 2, 512, 512),
    DenseWorkload("finetune", "deeplabv3", 4, 256, 256),
)


def select_workloads(tasks: Sequence[str], *, full: bool, smoke: bool) -> list[DenseWorkload]:
    """The workloads of ``tasks``: all of them with ``full``, else the first (the headline) of each task; with
    ``smoke`` the same models at 64 pixels, batch 1 or 2 (the pipeline end to end, in seconds).

    Args:
        tasks: names from :data:`TASKS`; others select nothing.
        full: every workload of each task, not only its first.
        smoke: tiny inputs instead of the sizes the models run at in practice.

    Returns:
        The workloads in :data:`DEFAULT_WORKLOADS`' order.
    """
    chosen = [w for w in DEFAULT_WORKLOADS if w.task in tasks]
    if not full:
        chosen = [w for w in chosen if w == next(first for first in chosen if first.task == w.task)]
    if smoke:
        chosen = [DenseWorkload(w.task, w.model, min(w.batch, 2), 64, 64) for w in chosen]
    return chosen


def build_pair(workload: DenseWorkload) -> tuple[str, nn.Module, nn.Module]:
    """The peer library's name, its own ResNet-50 model and ours, with the same random weights."""
    torch.manual_seed(0)
    size = dict(min_size=workload.height, max_size=max(workload.height, workload.width))
    if workload.model in ("fasterrcnn", "retinanet"):
        builder = getattr(detection, f"{workload.model}_resnet50_fpn")
        theirs = with_small_box_deltas(builder(weights=None, weights_backbone=None, **size))
        ours = build_detector(workload.model, "resnet50", **size)
    elif workload.model == "fcos":  # fine-tuning as from pretrained weights: FrozenBN, three stages trained
        levels = dict(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        body = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3, **levels
        )
        theirs = with_small_box_deltas(detection.FCOS(body, num_classes=91, **size))
        backbone = ResNetBackbone.from_preset("resnet50", norm_layer="frozen_batch")
        ours = build_detector("fcos", backbone, trainable_layers=3, **size)
    elif workload.model == "deeplabv3":
        theirs = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
        ours = build_segmenter("deeplabv3", "resnet50")
    else:
        theirs = smp.Unet("resnet50", encoder_weights=None)
        ours = smp.Unet("tu-rb_resnet50", encoder_weights=None)
        encoder = {
            f"encoder.model.model.{key}": value for key, value in to_canonical(theirs.encoder.state_dict())[0].items()
        }
        rest = {key: value for key, value in theirs.state_dict().items() if not key.startswith("encoder.")}
        ours.load_state_dict({**encoder, **rest})
        return "smp", theirs, ours
    load_torchvision_weights(ours, theirs)
    return "torchvision", theirs, ours


def with_small_box_deltas(model: nn.Module) -> nn.Module:
    """Box regression weights of a trained detector's size: random ones put boxes at the clamp of the deltas'
    exp, where a difference in the last bit of a feature moves a box by pixels and no check could pass."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("bbox_pred.weight", "bbox_reg.weight")):
                parameter.mul_(0.01)
    return model


def inputs_for(workload: DenseWorkload, seed: int = 0) -> Any:
    """The model's inputs (a batch, a list of images, or those and the targets in training), random from
    ``seed``: 0 for the timed call, others for int8's calibration."""
    generator = torch.Generator().manual_seed(seed)
    shape = (workload.batch, 3, workload.height, workload.width)
    images = torch.rand(shape, generator=generator)
    if workload.task == "segmentation":
        return images
    if workload.model == "deeplabv3":
        return images, torch.randint(0, 21, (workload.batch, workload.height, workload.width), generator=generator)
    boxes = torch.tensor([[8.0, 8.0, workload.width / 2, workload.height / 2]])
    targets = [dict(boxes=boxes, labels=torch.tensor([1])) for _ in range(workload.batch)]
    return list(images) if workload.task == "detection" else (list(images), targets)


def cases_for(
    workload: DenseWorkload, peer: str, *, compile: bool, full: bool, device: torch.device
) -> tuple[list, dict[str, str]]:
    """The (library, mode) cases, the peer's eager float32 first (the uncompiled ones only unless ``full``: the
    quick default compiles no whole model); and the skipped ones with the reason."""
    if workload.task == "finetune":
        cases = [(library, mode) for library in (peer, OURS) for mode in FINETUNE_MODES]
    else:
        cases = [(peer, mode) for mode in PEER_INFERENCE_MODES] + [(OURS, mode) for mode in OUR_INFERENCE_MODES]
    cases = cases if full else [case for case in cases if not case[1].compile]
    reasons = {case: why_not_run(case[1].dtype, case[1].compile, compile=compile, device=device) for case in cases}
    skipped = {f"{library} {mode.name}": why for (library, mode), why in reasons.items() if why is not None}
    return [case for case in cases if reasons[case] is None], skipped


def prepare(
    workload: DenseWorkload, mode: DenseMode, model: nn.Module, inputs: Any
) -> tuple[Callable[[], Any], nn.Module]:
    """A call that runs ``model`` in ``mode`` on ``inputs`` (the caller's model is left as it is), and the
    model it runs."""
    if workload.task == "finetune":
        model = copy.deepcopy(model).train()
        if mode.compile:
            compile_for_training(model)
        images, targets = inputs
        if mode.channels_last and isinstance(images, torch.Tensor):
            images = images.contiguous(memory_format=torch.channels_last)
        loss = detection_loss if workload.model == "fcos" else _segmentation_loss

        def step() -> torch.Tensor:
            torch.manual_seed(0)  # the same dropout masks (DeepLabV3's head) in every library and call
            model.zero_grad(set_to_none=True)
            value = loss(model, (images, targets))
            value.backward()
            return value.detach()

        return step, model
    if mode.fast_path:
        options = {}
        if mode.dtype == torch.int8:
            options["calibration"] = calibration_inputs(partial(inputs_for, workload))
        model = optimize_for_inference(model, dtype=mode.dtype, compile=mode.compile, **options)
    else:
        model = copy.deepcopy(model).eval()
        if mode.channels_last:
            model.to(memory_format=torch.channels_last)
        if mode.compile:
            for part in dense_parts(model).values():
                compile_for_inference(part)
    if mode.channels_last and isinstance(inputs, torch.Tensor):
        inputs = inputs.contiguous(memory_format=torch.channels_last)

    def run() -> Any:
        with torch.inference_mode():
            return model(inputs)

    return run, model


def _segmentation_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, masks = batch
    return F.cross_entropy(model(images)["out"], masks)


def run_dense_workload(
    workload: DenseWorkload,
    *,
    compile: bool,
    full: bool,
    rounds: int,
    matmul_size: int,
    device: torch.device,
    progress: tqdm,
) -> WorkloadResult:
    """Check every case's outputs against the peer's eager float32 model, then time them all interleaved
    with the matmul peaks; the fastest of ours is then timed part by part. The checked call is each case's
    warm-up (a whole model's call takes seconds on a CPU), and the reference's also counts the FLOPs."""
    progress.set_description(workload.label)
    peer, theirs, ours = build_pair(workload)
    models = {peer: theirs.to(device), OURS: ours.to(device)}
    inputs = inputs_for(workload)
    cases, skipped = cases_for(workload, peer, compile=compile, full=full, device=device)
    reference_case = cases[0]
    runs, prepared, first_calls, agreements = {}, {}, {}, {}
    for case in cases:
        library, mode = case
        run, prepared[case] = prepare(workload, mode, models[library], inputs)
        recording = recorded_outputs(prepared[case]) if workload.task == "detection" else nullcontext([])
        with recording as dense_outputs:
            if case == reference_case:
                (flops, reference), first_calls[case] = first_call(partial(count_flops, run))
                output, reference_dense_outputs = reference, dense_outputs
            else:
                output, first_calls[case] = first_call(run)
        dense = reference_dense_outputs, dense_outputs
        name = f"{workload.label}, {library} {mode.name}"
        agreements[case] = _checked_agreement(workload, (reference, output), dense, mode.dtype, name)
        runs[case] = run
        progress.update()
    matmuls = matmul_runs(device, matmul_size)
    for run in matmuls.values():
        run()
    timings = time_interleaved({**runs, **matmuls}, rounds=rounds, warmup=0, device=device, progress=progress)
    peaks = {dtype: count_flops(run)[0] / timings.pop(dtype).median / 1e9 for dtype, run in matmuls.items()}
    training = workload.task == "finetune"
    memory = {key: peak_memory_bytes(run, device) for key, run in runs.items()} if training else {}
    fastest = min((case for case in timings if case[0] == OURS), key=lambda case: timings[case].median)
    split = time_parts(prepared[fastest], runs[fastest])
    torch.compiler.reset()
    results = case_results(timings, reference_case, workload.batch, flops, peaks, first_calls, agreements, memory)
    return WorkloadResult(
        label=workload.label,
        kind=workload.task,
        architecture=workload.model,
        batch=workload.batch,
        size=workload.height,
        flops=flops,
        matmul_peak_gflops=peaks,
        reference=f"{reference_case[0]} {reference_case[1].name}",
        outputs_checked=True,
        cases=results,
        skipped=skipped,
        part_split_ms={"mode": f"{fastest[0]} {fastest[1].name}", **split},
        slow_compiled=find_slow_compiled(results),
    )


def _checked_agreement(
    workload: DenseWorkload,
    outputs: tuple[Any, Any],
    dense_outputs: tuple[list[torch.Tensor], list[torch.Tensor]],
    dtype: torch.dtype,
    case: str,
) -> Agreement:
    """A case's outputs against the reference's: the max difference (detections, logits, loss) within its
    tolerance; the least cosine similarity of the dense outputs (a detector's dense parts', a segmenter's
    logits; none for a training step's loss), checked for int8. A detector's detections are compared in float32
    only: below it, a score near the threshold may cross it and a detection come or go (bf16 at 800x1216 does),
    so its dense outputs are held to the cosine of its precision instead.
    """
    reference, output = outputs
    detection = workload.task == "detection"
    low_precision_detection = detection and dtype != torch.float32
    difference = None if low_precision_detection else checked_difference(reference, output, tolerance_for(dtype), case)
    if workload.task == "finetune":
        return Agreement(difference, None)
    compared = dense_outputs if detection else ([_logits(reference)], [_logits(output)])
    min_cosine = min_cosine_for(dtype) or (LOW_PRECISION_MIN_COSINE if low_precision_detection else None)
    return Agreement(difference, checked_min_cosine(*compared, min_cosine, case))


def checked_difference(reference: Any, actual: Any, tolerance: float | None, case: str) -> float:
    """The largest difference from the reference: detections matched by label and box (any order among
    equal scores), logits and losses as a fraction of their scale; raise past ``tolerance`` (None: not
    checked, int8)."""
    if isinstance(reference, list):  # detections, one dict per image
        difference = max((_detection_difference(e, a) for e, a in zip(reference, actual, strict=True)), default=0.0)
        tolerance = max(tolerance, 1e-3)  # boxes may move by 1e-3 of the image scale, about a pixel
    else:
        expected, output = _logits(reference), _logits(actual)
        if expected.shape != output.shape:
            raise RuntimeError(f"{case}: output shape {tuple(output.shape)} differs from the reference's.")
        difference = ((expected.float() - output.float()).abs().max() / expected.abs().max()).item()
    if tolerance is not None and not difference <= tolerance:
        raise RuntimeError(
            f"{case}: outputs differ from the reference by {difference:.3g} of their scale (tolerance {tolerance:g}); "
            "a model that computes something else is not timed."
        )
    return difference


def _logits(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """A segmenter's logits (torchvision's under ``"out"``, smp's as they come), or a loss as it is."""
    return output["out"] if isinstance(output, dict) else output


def _detection_difference(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """Largest box distance to the nearest box of the same label, both ways, over the image scale; infinite
    when the labels differ."""
    if not torch.equal(expected["labels"].sort().values, actual["labels"].sort().values):
        return float("inf")
    worst = 0.0
    for label in expected["labels"].unique():
        theirs, mine = expected["boxes"][expected["labels"] == label], actual["boxes"][actual["labels"] == label]
        distances = torch.cdist(mine.float(), theirs.float(), p=float("inf"))
        worst = max(worst, distances.min(0).values.max().item(), distances.min(1).values.max().item())
    scale = expected["boxes"].abs().max().item() if len(expected["boxes"]) else 1.0
    return worst / scale
