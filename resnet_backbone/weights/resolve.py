"""What a source named by text is: a preset, a local file or folder, a Hugging Face Hub repo id, a URL, or (where
the caller reads them) a torchvision weights name or a timm model name.

Every entry point that takes a source by name (``load``, ``from_pretrained``, ``from_torchvision``, ``from_timm``,
the adapters' builders, the command line) asks :func:`resolve_source`, so the same text means the same thing,
and a source that is none of these gets the same error, everywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..hints import close_match_hint
from ..presets import PRESETS

WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# A Hub repo id is "namespace/name"; a bare name is a preset or an error, never a Hub lookup.
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_TORCHVISION_WEIGHTS_EXAMPLE = "ResNet50_Weights.IMAGENET1K_V2"
_EXPECTED = {
    "preset": "a preset name, a checkpoint file or folder, a Hub repo id or a URL",
    "torchvision": f"a checkpoint file, a URL or a torchvision weights name (e.g. {_TORCHVISION_WEIGHTS_EXAMPLE!r})",
    "timm": "a checkpoint file, a URL or a timm model name (e.g. 'resnet50.a1_in1k')",
}

SourceKind = Literal["preset", "file", "folder", "hub", "url", "torchvision_weights", "timm_name"]
Names = Literal["preset", "torchvision", "timm"]


@dataclass(frozen=True)
class Source:
    """A resolved source, from :func:`resolve_source`; ``path`` is ``value`` as a ``Path``.

    Attributes:
        kind: what it is: ``"preset"``, ``"file"``, ``"folder"``, ``"hub"``, ``"url"``, or (where the caller
            reads them) ``"torchvision_weights"`` or ``"timm_name"``.
        value: the text that names it (a path's text for a file or folder).
    """

    kind: SourceKind
    value: str

    @property
    def path(self) -> Path:
        return Path(self.value)


def resolve_source(source: str | os.PathLike | Source, *, names: Names = "preset") -> Source:
    """Say what ``source`` is, checking only the local disk (nothing is downloaded or read).

    Args:
        source: the text or path a user passed; a :class:`Source` is returned as it is.
        names: what a name that is no path means: ``"preset"`` (a preset, or a Hub repo id ``namespace/name``),
            ``"torchvision"`` (a weights name, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``) or ``"timm"`` (a timm
            model name, checked by the caller, which imports timm).

    Returns:
        The :class:`Source`. A string with ``://`` is a URL; a preset name wins over a local path of that name.

    Raises:
        ValueError: a path that does not exist, or a name that is none of the above (with a close match).
        TypeError: ``source`` is not text, a path or a :class:`Source`.
    """
    if isinstance(source, Source):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Expected {_EXPECTED[names]} as a str or os.PathLike, got {type(source).__name__}.")
    text = os.fspath(source)
    is_text = isinstance(source, str)
    if is_text and "://" in text:
        return Source("url", text)
    if is_text and names == "preset" and text in PRESETS:
        return Source("preset", text)
    path = Path(text)
    if path.is_dir():
        return Source("folder", text)
    if path.is_file():
        return Source("file", text)
    if not is_text or _looks_like_a_path(text):
        raise ValueError(f"{text} does not exist.")
    if names == "timm":
        return Source("timm_name", text)
    if names == "torchvision" and "_Weights." in text:
        return Source("torchvision_weights", text)
    if names == "preset" and _HUB_REPO_ID.fullmatch(text):
        return Source("hub", text)
    if names == "torchvision":
        raise ValueError(
            f"{text!r} is neither an existing path, a URL nor a torchvision weights name (e.g. "
            f"{_TORCHVISION_WEIGHTS_EXAMPLE!r})."
        )
    raise ValueError(
        f"{text!r} is neither a preset nor an existing path or Hub repo id.{close_match_hint(text, PRESETS)} "
        f"Presets: {', '.join(PRESETS)}. A Hub repo id reads 'namespace/name', e.g. 'microsoft/resnet-50'."
    )


def _looks_like_a_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).suffix in (*WEIGHTS_SUFFIXES, ".json")
