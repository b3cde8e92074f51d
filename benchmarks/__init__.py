"""Side-by-side benchmark of this project's ResNetBackbone against torchvision, timm and transformers.

Run ``resnet-backbone bench`` (any install: this package installs as ``resnet_backbone.benchmarks``) or
``python -m benchmarks`` from the repository root; ``--help`` lists the options; ``--report docs/benchmarks.md``
writes the tables as the documentation's generated page. See docs/performance.md.
"""

from .suite import main

__all__ = ["main"]
