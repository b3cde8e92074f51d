"""RoI pooling as one sparse matrix product, for torchvision's two-stage detectors at inference on a CPU.

torchvision's CPU ``roi_align`` visits each channel of each sample point one at a time, on one thread: for
Faster R-CNN's 1000 proposals at 800x1216, a third of the time of its int8 call on 2 cores.
Each pooled value is a fixed weighted sum of at most ``4 * sampling_ratio**2`` feature pixels, the same for
every channel, so the pooling of all RoIs of a level is a sparse matrix (pooled bins x feature pixels) times
the feature map seen as a (pixels x channels) matrix, which a channels_last map already is: one multithreaded
product, with the bilinear weights of ``roi_align`` (the same rules at the borders).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales

__all__ = ["SparseMultiScaleRoIAlign", "roi_align_matrix"]


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with the same settings and outputs, pooling with :func:`roi_align_matrix` where it
    can: float32 feature maps on a CPU, no autograd, a fixed ``sampling_ratio`` and no tracing or scripting.
    Elsewhere it is torchvision's own. Its output is channels_last.

    Args:
        featmap_names: as ``MultiScaleRoIAlign``'s, like the other arguments.
        output_size: the pooled size.
        sampling_ratio: sample points per bin along each side (0: adaptive, pooled by torchvision).
        canonical_scale: the FPN paper's level mapping, as torchvision's.
        canonical_level: likewise.
    """

    @classmethod
    def from_module(cls, pooler: MultiScaleRoIAlign) -> SparseMultiScaleRoIAlign:
        """What ``optimize_for_inference`` puts in place of ``pooler``.

        Args:
            pooler: torchvision's pooler, maybe already set up by a call (its scales are kept).

        Returns:
            The sparse pooler with ``pooler``'s settings and scales.
        """
        sparse = cls(
            pooler.featmap_names,
            pooler.output_size,
            pooler.sampling_ratio,
            canonical_scale=pooler.canonical_scale,
            canonical_level=pooler.canonical_level,
        )
        sparse.scales, sparse.map_levels = pooler.scales, pooler.map_levels
        return sparse

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if not self._pools_sparsely(features, boxes):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = torch.cat([torch.cat([box.new_full((len(box), 1), index), box], 1) for index, box in enumerate(boxes)])
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        height, width = self.output_size
        pooled = features[0].new_zeros(len(rois), height, width, features[0].shape[1])
        for level, (feature_map, scale) in enumerate(zip(features, self.scales)):
            in_level = torch.where(levels == level)[0]
            if len(in_level):
                matrix = roi_align_matrix(
                    rois[in_level], feature_map.shape, self.output_size, scale, self.sampling_ratio
                )
                pixels = feature_map.permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1])
                pooled[in_level] = (matrix @ pixels).view(len(in_level), height, width, -1)
        return pooled.permute(0, 3, 1, 2)

    def _pools_sparsely(self, features: list[Tensor], boxes: list[Tensor]) -> bool:
        return (
            self.sampling_ratio > 0  # else the number of samples varies per RoI
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
            and all(f.device.type == "cpu" and f.dtype == torch.float32 for f in features)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in [*features, *boxes]))
        )


def roi_align_matrix(
    rois: Tensor, feature_shape: torch.Size, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """The sparse (RoIs x bins, images x height x width) matrix whose product with a feature map seen as a
    (pixels, channels) matrix is ``torchvision.ops.roi_align(feature_map, rois, output_size, spatial_scale,
    sampling_ratio, aligned=False)``, bins in row-major order.

    Args:
        rois: ``(K, 5)``: image index, then x1, y1, x2, y2 in image coordinates.
        feature_shape: the feature map's ``(N, C, H, W)``.
        output_size: ``(height, width)`` of each pooled RoI.
        spatial_scale: feature map size over image size.
        sampling_ratio: sample points per bin along each side (fixed, > 0).

    Returns:
        A float32 sparse CSR matrix of ``K * height * width`` rows, ``4 * sampling_ratio**2`` entries each.
    """
    images, _, feature_height, feature_width = feature_shape
    scaled = rois[:, 1:] * spatial_scale
    rows_y, weights_y = _axis_samples(scaled[:, 1], scaled[:, 3], output_size[0], sampling_ratio, feature_height)
    rows_x, weights_x = _axis_samples(scaled[:, 0], scaled[:, 2], output_size[1], sampling_ratio, feature_width)
    # (K, bin y, bin x, samples y, samples x): every pairing of the two axes' samples and their corners.
    image = rois[:, 0].long()[:, None, None, None, None] * (feature_height * feature_width)
    columns = image + rows_y[:, :, None, :, None] * feature_width + rows_x[:, None, :, None, :]
    values = weights_y[:, :, None, :, None] * weights_x[:, None, :, None, :] / sampling_ratio**2
    entries = columns.shape[-2] * columns.shape[-1]
    rows = columns.shape[0] * columns.shape[1] * columns.shape[2]
    # int32 indices (any feature map has fewer pixels): the product runs a quarter faster than with int64.
    row_starts = torch.arange(0, rows * entries + 1, entries, dtype=torch.int32)
    shape = (rows, images * feature_height * feature_width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(row_starts, columns.reshape(-1).int(), values.reshape(-1), shape)


def _axis_samples(start: Tensor, end: Tensor, bins: int, samples: int, size: int) -> tuple[Tensor, Tensor]:
    """Along one axis: for each RoI, bin and sample point, its two neighbouring pixel indices and their bilinear
    weights, ``(K, bins, 2 * samples)`` each, as torchvision's ``roi_align`` computes them: a point more than
    one pixel outside the map weighs nothing, one just outside reads the border pixel."""
    length = (end - start).clamp(min=1.0)  # aligned=False: a RoI is at least one pixel
    bin_size = (length / bins)[:, None, None]
    offsets = (torch.arange(samples, dtype=start.dtype) + 0.5)[None, None, :] * bin_size / samples
    points = start[:, None, None] + torch.arange(bins, dtype=start.dtype)[None, :, None] * bin_size + offsets
    inside = (points >= -1.0) & (points <= size)
    points = points.clamp(min=0.0)
    low = points.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    fraction = torch.where(at_edge, 0.0, points - low)
    weights = torch.stack([1.0 - fraction, fraction], -1) * inside[..., None]
    return torch.stack([low, high], -1).flatten(-2), weights.flatten(-2)
