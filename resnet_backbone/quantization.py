"""int8 inference: static post-training quantization of a model's dense parts with torchao's PT2E flow.

Each dense part (a backbone, an FPN, a detector's convolutional heads) is captured with ``torch.export`` at
the calibration images' sizes, annotated by torchao's ``X86InductorQuantizer`` (int8 activations per tensor,
int8 weights per output channel), calibrated on the user's inputs and converted; inductor, compiling with
freezing, then turns each quantize-convolution-dequantize pattern into one oneDNN int8 convolution. Only the
dense parts change: anchors, NMS, RoI heads and post-processing of a whole model keep computing in float32.

A quantized model is kept as one ``torch.export`` program per dense part (:func:`save_quantized`), beside the
float model's own checkpoint; :func:`load_quantized` puts them back into the float model, with no calibration.
torchao (the ``int8`` extra) is imported by the functions that need it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from .torch_compat import tree_map

MANIFEST_NAME = "quantization.json"
# What each part runs once quantized (an attribute of the part; ``forward`` runs it).
PROGRAM_ATTRIBUTE = "int8_program"
# The exported program it came from, which save_quantized writes (None while calibrating).
EXPORTED_ATTRIBUTE = "int8_exported_program"
_FORMAT = 1
_CAPTURE_SIDE = 256


def quantize_parts(model: nn.Module, part_names: Sequence[str], calibration: Iterable[Any]) -> None:
    """Quantize the parts of ``model`` named ``part_names`` in place, calibrated on ``calibration``.

    ``model`` is in eval mode with its norms already folded. Each part then runs its quantized program from
    its own ``forward``, so the model around it calls it as before.

    Args:
        model: the whole model.
        part_names: its dense parts (``""``: the model itself).
        calibration: inputs as the model takes them, one call each (each item is the model's first argument:
            a batch of images for a backbone, a list of images for a torchvision detector).

    Raises:
        ValueError: ``calibration`` is empty or not iterable, or a part is never called on it.
        ImportError: torchao is not installed.
    """
    prepare_pt2e, convert_pt2e, quantizer = _torchao_pt2e()
    samples = _calibration_samples(calibration)
    parts = {name: model.get_submodule(name) for name in part_names}
    examples = _first_inputs(model, parts, _capture_sample(samples[0]))
    with torch.no_grad():
        for name, part in parts.items():
            args, kwargs = examples[name]
            captured = _export(part, args, kwargs).module()
            _name_each_call(captured)
            _weight_of_its_own_per_call(captured)
            _run_program(part, prepare_pt2e(captured, quantizer))
        for index, sample in enumerate(samples):
            try:
                model(sample)
            except AssertionError as error:  # a program's guard on the sizes it was captured for
                raise ValueError(
                    f"calibration input {index}: {error}. The int8 programs take inputs whose every feature map is "
                    "2x2 or larger (for a backbone of stride 32: images of 33 pixels a side or more)."
                ) from None
        for name, part in parts.items():
            args, kwargs = examples[name]
            program = _export(convert_pt2e(getattr(part, PROGRAM_ATTRIBUTE)), args, kwargs)
            _run_program(part, program.module(), program)


def computes_int8_natively(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs int8 convolutions fast: a CPU with int8 dot-product instructions (AVX512-VNNI,
    AVX-VNNI or AMX-INT8). Elsewhere int8 is emulated through wider integers and gains little over float32;
    the int8 fast path is for CPUs only, so a CUDA device gives False.

    Args:
        device: a device or its name.

    Returns:
        True where int8 is computed natively.
    """
    if torch.device(device).type != "cpu":
        return False
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the quantized parts of ``model`` (from ``optimize_for_inference(..., dtype=torch.int8)``) to
    ``directory``: one ``torch.export`` program per part and a manifest naming them.

    The float model is not written: keep its own checkpoint beside it, from which :func:`load_quantized`
    rebuilds the rest. Written in a temporary folder and renamed into place, so a failed write leaves nothing.

    Args:
        model: the quantized model.
        directory: a folder that does not exist yet.

    Returns:
        The folder written.

    Raises:
        ValueError: ``model`` has no quantized part.
        FileExistsError: ``directory`` exists.
    """
    programs = quantized_programs(model)
    if not programs:
        raise ValueError(
            f"save_quantized takes a model from optimize_for_inference(..., dtype=torch.int8), got a "
            f"{type(model).__name__} with no quantized part."
        )
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new folder for the quantized model.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        files = {}
        for name, program in programs.items():
            files[name] = _program_file(name)
            with warnings.catch_warnings():  # torch.export.save's note on tensors sharing storage
                warnings.simplefilter("ignore", UserWarning)
                torch.export.save(program, staging / files[name])
        manifest = {"format": _FORMAT, "parts": files, "torch": torch.__version__, "torchao": _torchao_version()}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, str]:
    """The quantized parts saved in ``directory``: ``{part name: program file}``.

    Raises:
        FileNotFoundError: ``directory`` holds no quantized model.
        ValueError: its manifest is not one :func:`save_quantized` writes.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no quantized model: {MANIFEST_NAME} is missing.")
    try:
        manifest = json.loads(path.read_text())
        parts = manifest["parts"]
        if manifest["format"] != _FORMAT or not isinstance(parts, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a quantization manifest written by save_quantized.") from None
    missing = [file for file in parts.values() if not (Path(directory) / file).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}, which {MANIFEST_NAME} names.")
    return parts


def load_programs(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Make the parts of ``model`` run the programs saved in ``directory``, and return the parts' names.

    Args:
        model: the float model the programs were quantized from, in eval mode with its norms folded.
        directory: a folder :func:`save_quantized` wrote.

    Raises:
        ValueError: ``model`` lacks a part the folder names.
    """
    _torchao_pt2e()  # registers the quantized operators the programs call
    parts = read_manifest(directory)
    names = dict(model.named_modules())
    absent = [name for name in parts if name not in names]
    if absent:
        raise ValueError(
            f"{directory} holds quantized parts {', '.join(map(repr, absent))} that this {type(model).__name__} "
            "does not have: it was quantized from another model."
        )
    for name, file in parts.items():
        program = torch.export.load(Path(directory) / file)
        _run_program(names[name], program.module(), program)
    return list(parts)


def quantized_programs(model: nn.Module) -> dict[str, ExportedProgram]:
    """The exported program of each quantized part of ``model``, by part name."""
    return {
        name: getattr(module, EXPORTED_ATTRIBUTE)
        for name, module in model.named_modules()
        if isinstance(getattr(module, EXPORTED_ATTRIBUTE, None), ExportedProgram)
    }


def _program_file(part_name: str) -> str:
    return f"{part_name or 'model'}.pt2"


def _run_program(part: nn.Module, program: nn.Module, exported: ExportedProgram | None = None) -> None:
    """Make ``part.forward`` run ``program`` (a submodule of the part, so it moves with it).

    torch.export's module refuses ``train`` and ``eval``, so ``model.eval()`` on the whole model would fail;
    the program computes in eval mode whatever the flag says, so ``eval`` passes and ``train`` refuses."""
    program.train = types.MethodType(_inference_only, program)
    del program.eval  # torch.export's refusal; nn.Module.eval calls train(False)
    setattr(part, PROGRAM_ATTRIBUTE, program)
    part.forward = types.MethodType(_forward_through_program, part)
    setattr(part, EXPORTED_ATTRIBUTE, exported)


def _inference_only(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "An int8 model runs inference only: call train() on the float model it was quantized from, and "
            "quantize it again after training."
        )
    return self


def _forward_through_program(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, PROGRAM_ATTRIBUTE)(*args, **kwargs)


def _export(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExportedProgram:
    """``module`` captured with every size of every tensor input left free (torch.export fixes those the
    program needs fixed, such as the channels)."""

    def free(value: Any) -> dict[int, Any] | None:
        return {axis: Dim.AUTO for axis in range(value.ndim)} if isinstance(value, torch.Tensor) else None

    dynamic_shapes = (tree_map(free, args), tree_map(free, kwargs))
    if not kwargs:
        dynamic_shapes = dynamic_shapes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)


def _name_each_call(graph_module: torch.fx.GraphModule) -> None:
    """Give each call of a module called more than once (a detector head run once per feature level) a name of
    its own in the nodes' ``nn_module_stack``. The quantizer groups the operators of a strict=False capture by
    the module that ran them, and refuses a group with several outputs, which one module called per level
    would be. torch.export already numbers the calls in the stack's keys (``...conv@1``): the name takes it."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, (name, module_type) = next(reversed(stack.items()))
            call = key.rpartition("@")[2] if "@" in key else ""
            if call:
                stack[key] = (f"{name}@{call}", module_type)


_WEIGHTED_OPERATORS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _weight_of_its_own_per_call(graph_module: torch.fx.GraphModule) -> None:
    """Give each call of a convolution or linear layer run more than once (a detector head's, once per feature
    level) a copy of the weight of its own. Inductor turns dequantize-convolution into one int8 convolution only
    where the dequantized weight feeds that convolution alone, and it merges the identical dequantizations of
    one shared weight: a head's convolutions would then run in float32 on dequantized weights, as slowly as
    before quantizing."""
    for node in list(graph_module.graph.nodes):
        calls = [user for user in node.users if user.target in _WEIGHTED_OPERATORS and user.args[1] is node]
        if node.op != "get_attr" or len(calls) < 2:
            continue
        weight = graph_module.get_parameter(node.target)
        for index, call in enumerate(calls[1:], start=1):
            name = f"{node.target.replace('.', '_')}_call{index}"
            graph_module.register_parameter(name, nn.Parameter(weight.detach().clone(), requires_grad=False))
            with graph_module.graph.inserting_before(call):
                call.replace_input_with(node, graph_module.graph.get_attr(name))
    graph_module.recompile()


def _first_inputs(
    model: nn.Module, parts: dict[str, nn.Module], sample: Any
) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The arguments each part receives when ``model`` runs ``sample``."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(name, (args, kwargs))

        return record

    with _hooks(parts, recorder), torch.no_grad():
        model(sample)
    never_called = [name for name in parts if name not in seen]
    if never_called:
        raise ValueError(
            f"int8 calibration: the model never called its dense part(s) {', '.join(map(repr, never_called))} on "
            "the first calibration input. Pass inputs the model runs all of its dense parts on, or parts=[...] "
            "naming those it does."
        )
    return seen


@contextmanager
def _hooks(parts: dict[str, nn.Module], recorder: Callable[[str], Callable[..., None]]):
    handles = [part.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, part in parts.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _calibration_samples(calibration: Iterable[Any]) -> list[Any]:
    if isinstance(calibration, torch.Tensor) or not isinstance(calibration, Iterable):
        shape = f" of shape {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor) else ""
        raise ValueError(
            "calibration is an iterable of inputs, one model call each (e.g. a list of image batches), got a "
            f"{type(calibration).__name__}{shape}. Wrap a single batch in a list: calibration=[batch]."
        )
    samples = list(calibration)
    if not samples:
        raise ValueError("calibration is empty: pass a few dozen of your own images, as the model takes them.")
    return samples


def _capture_sample(sample: Any) -> Any:
    """What the programs are captured on: ``sample`` with its batch doubled (a tensor's first dimension, or a
    list's images) and a batch of images at least ``_CAPTURE_SIDE`` pixels a side. torch.export fixes every size
    of 1 it meets, and the sizes that lead to one (a 32-pixel image has a 1x1 deepest feature map), so a
    program captured at one small image would run at that image's size and batch only. Its values do not
    matter: calibration runs on the samples themselves. A detector resizes each image itself."""
    if isinstance(sample, torch.Tensor):
        batch = torch.cat([sample, sample])
        if batch.ndim == 4 and min(batch.shape[-2:]) < _CAPTURE_SIDE:
            scale = _CAPTURE_SIDE / min(batch.shape[-2:])
            size = [round(side * scale) for side in batch.shape[-2:]]
            batch = torch.nn.functional.interpolate(batch, size=size)
        return batch
    if isinstance(sample, (list, tuple)):
        return type(sample)([*sample, *sample])
    return sample


def _torchao_pt2e() -> tuple[Callable, Callable, Any]:
    """torchao's ``prepare_pt2e``, ``convert_pt2e`` and an ``X86InductorQuantizer`` with its default static
    configuration (per-channel weights); importing the quantizer registers inductor's int8 patterns."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as error:
        raise ImportError(
            'int8 inference needs torchao: pip install "resnet-backbone[int8]" (or pip install torchao).'
        ) from error
    quantizer = x86.X86InductorQuantizer()
    # Without VNNI the int8 products are summed in 16 bits: a 7-bit range keeps them from overflowing.
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=not computes_int8_natively("cpu"))
    quantizer.set_global(config)
    return prepare_pt2e, convert_pt2e, quantizer


def _torchao_version() -> str:
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return "unknown"
