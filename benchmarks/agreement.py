"""How closely a case's outputs agree with the float32 eager reference as cosine similarity: the accuracy
column next to the speed, and the parity check of int8, whose error is too uneven for a max-difference bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def checked_min_cosine(
    reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], required: float | None, case: str
) -> float:
    """The smallest cosine similarity between each reference tensor and its counterpart, each flattened whole;
    raise below ``required``.

    Args:
        reference: the reference's outputs (feature maps, logits, dense parts' outputs), in order.
        actual: the case's outputs, in the same order and shapes.
        required: the mode's bound (None: its parity is checked by max difference instead).
        case: names the case in the errors.

    Returns:
        The minimum over the pairs (1.0 for identical directions).

    Raises:
        RuntimeError: the shapes differ from the reference's, or the similarity is below ``required``.
    """
    shapes = [tuple(tensor.shape) for tensor in actual]
    if shapes != [tuple(tensor.shape) for tensor in reference]:
        raise RuntimeError(f"{case}: output shapes {shapes} differ from the reference's.")
    cosine = min(
        F.cosine_similarity(expected.double().flatten(), output.double().flatten(), dim=0).item()
        for expected, output in zip(reference, actual)
    )
    if required is not None and not cosine >= required:
        raise RuntimeError(
            f"{case}: outputs agree with the reference to a cosine similarity of {cosine:.4f}, below the "
            f"{required:g} this mode requires; a model that computes something else is not timed."
        )
    return cosine


@dataclass(frozen=True)
class Agreement:
    """A case's outputs against the reference's: the largest difference as a fraction of their scale (None
    where it is not comparable, e.g. int8 detections), and the least cosine similarity (None for a loss)."""

    max_relative_diff: float | None
    min_cosine: float | None
