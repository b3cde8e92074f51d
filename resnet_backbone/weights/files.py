"""Checkpoint files: safe reading, atomic writing, and finding a source's files (local, on the Hugging Face Hub,
or at a URL).

Reading never unpickles arbitrary objects: safetensors first, and ``.bin``/``.pth`` files only through
``torch.load(weights_only=True)``. Writing refuses a model optimised for inference, whose weights no longer
fit the layout a checkpoint's readers expect.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .layouts import extract_state_dict
from .resolve import WEIGHTS_SUFFIXES, Source, resolve_source

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
EXPECTED_CHECKPOINT = (
    f"expected a weights file ({'/'.join(WEIGHTS_SUFFIXES)}) or a folder with {CONFIG_NAME} and "
    f"{' or '.join(WEIGHTS_NAMES)}"
)
# How a torch.save file starts: its zip archive, or (its format before torch 1.6) a pickle of protocol 2 or higher.
_TORCH_SAVE_SIGNATURES = (b"PK\x03\x04", b"\x80")

# Set on every module of optimize_for_inference's result (a detector's backbone too).
OPTIMIZED_FOR_INFERENCE = "optimized_for_inference"


def mark_optimized_for_inference(model: torch.nn.Module) -> None:
    """Flag ``model`` and every module in it as optimised for inference, so no checkpoint is written from them."""
    for module in model.modules():
        setattr(module, OPTIMIZED_FOR_INFERENCE, True)


def refuse_optimized_for_inference(model: torch.nn.Module) -> None:
    """Raise, before anything is written, if ``model`` went through ``optimize_for_inference``: its state dict
    (convolutions with folded-in norms, no norm layers, perhaps another dtype) would load back wrong."""
    if getattr(model, OPTIMIZED_FOR_INFERENCE, False):
        raise ValueError(
            f"This {type(model).__name__} was optimised for inference (BatchNorm folded into the convolutions, "
            "weights perhaps cast or compiled): its weights no longer fit the original layout and would load back "
            "wrong. Save the original model instead (optimize_for_inference returns a copy unless inplace=True)."
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU; a clear error for anything unsafe, damaged or not a
    checkpoint at all.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file (read with ``weights_only=True``: pickled
            Python objects could run code, so a file holding any is refused).

    Returns:
        ``{key: tensor}``, unwrapped from a ``{"state_dict": ...}``-style container.

    Raises:
        ValueError: a folder, a missing file, or a file that is truncated, corrupt, unsafe or no checkpoint,
            each named with the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file: {EXPECTED_CHECKPOINT}.")
    if not path.is_file():
        raise ValueError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    with path.open("rb") as file:
        head = file.read(64)
    if not head.startswith(_TORCH_SAVE_SIGNATURES):
        raise ValueError(f"{path} is {_what_is_not_a_checkpoint(head)}, not a checkpoint: {EXPECTED_CHECKPOINT}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: it holds Python objects other than tensors, and unpickling them could run "
            f"arbitrary code. Re-save it as a plain state dict or as safetensors. ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    return extract_state_dict(loaded, source=str(path))


def _what_is_not_a_checkpoint(head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON file"
    return "a file in neither safetensors' nor torch.save's format"


def write_checkpoint(directory: str | os.PathLike, config_json: str, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, atomically per file.

    Both files are first written in full (and flushed to disk) under temporary names beside their targets,
    then renamed over them. An interrupted save leaves the previous checkpoint as it was and no partial
    file under a checkpoint name.

    Args:
        directory: the folder (created if needed).
        config_json: the text of ``config.json`` (``ResNetConfig.to_json_string()``).
        state_dict: the tensors.

    Returns:
        The folder.

    Raises:
        OSError: the folder cannot be written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    try:
        weights = _stage(directory, WEIGHTS_NAMES[0], _tensor_writer(state_dict, ".safetensors"))
        staged.append(weights)
        config = _stage(directory, CONFIG_NAME, lambda p: p.write_text(config_json, encoding="utf-8"))
        staged.append(config)
        os.replace(weights, directory / WEIGHTS_NAMES[0])
        os.replace(config, directory / CONFIG_NAME)
        _fsync(directory)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return directory


def write_state_dict_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write a state dict as safetensors (``.safetensors``) or a ``torch.save`` file (anything else),
    atomically."""
    return atomic_write(path, _tensor_writer(state_dict, Path(path).suffix))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(temporary_path)`` and rename the result over ``path``: readers see the old file or the
    complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_stage(path.parent, path.name, write), path)
    return path


def _tensor_writer(state_dict: Mapping[str, torch.Tensor], suffix: str) -> Callable[[Path], object]:
    tensors = {key: value.detach().contiguous().cpu() for key, value in state_dict.items()}
    if suffix == ".safetensors":
        return lambda path: save_file(tensors, path, metadata={"format": "pt"})
    return lambda path: torch.save(tensors, path)


def _stage(directory: Path, name: str, write: Callable[[Path], object]) -> Path:
    """Write a file under a hidden temporary name beside its target (same file system, so renaming is atomic)."""
    path = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        write(path)
        _fsync(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def locate_checkpoint(
    source: str | os.PathLike | Source,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[Path | None, Path]:
    """``(config.json or None, weights file)`` for a folder, a weights file, a Hub repo id or a URL.

    Hub files go through ``huggingface_hub``, so its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply (and the
    keyword options); a URL's file is downloaded once into torch's hub cache (see :func:`local_weights_file`).
    """
    source = resolve_source(source)
    if source.kind == "folder":
        return _in_folder(source.path)
    if source.kind == "hub":
        return _download(source.value, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if source.kind in ("file", "url"):
        return None, local_weights_file(source, local_files_only=local_files_only)
    raise ValueError(
        f"{source.value!r} is a preset, which has no weights: from_preset({source.value!r}) or "
        f"load({source.value!r}) builds it with random weights; from_pretrained reads a checkpoint."
    )


def local_weights_file(source: Source, *, local_files_only: bool = False) -> Path:
    """The local file of a file source, or of a URL: downloaded once into ``$TORCH_HOME/hub/checkpoints`` (where
    torchvision keeps its weights) and read from there afterwards. The cached name starts with a hash of the
    URL, so two URLs that end in the same file name (``.../model.safetensors``) never share a file."""
    if source.kind != "url":
        return source.path
    name = Path(urllib.parse.urlparse(source.value).path).name
    if not name:
        raise ValueError(f"{source.value} names no file: expected a URL ending in the checkpoint's file name.")
    url_hash = hashlib.sha256(source.value.encode()).hexdigest()[:16]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{url_hash}-{name}"
    if cached.is_file():
        return cached
    if local_files_only:
        raise ValueError(f"{source.value} is not in the download cache ({cached}) and local_files_only is set.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(source.value, os.fspath(cached), progress=True)
    except (OSError, ValueError) as error:  # urllib's URLError and HTTPError are OSErrors
        raise ValueError(f"Could not download {source.value}: {error}") from None
    return cached


def _in_folder(folder: Path) -> tuple[Path | None, Path]:
    weights = next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)
    if weights is None:
        contents = sorted(p.name for p in folder.iterdir())
        raise ValueError(
            f"{folder} holds no weights: expected {' or '.join(WEIGHTS_NAMES)}, found {contents or 'nothing'}."
        )
    config = folder / CONFIG_NAME
    return (config if config.is_file() else None), weights


def _download(repo_id: str, **hub_options) -> tuple[Path, Path]:
    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, **hub_options))

    try:
        config = fetch(CONFIG_NAME)
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise ValueError(
            f"{repo_id!r} is neither a local directory or file nor a Hub repo whose config.json could be "
            f"fetched ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    for name in WEIGHTS_NAMES:
        try:
            return config, fetch(name)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
    raise ValueError(f"The Hub repo {repo_id!r} has a config.json but none of {list(WEIGHTS_NAMES)}.")
