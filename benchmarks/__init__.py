"""Side-by-side benchmark of this project's ResNetBackbone against torchvision, timm and transformers.

Run ``python -m benchmarks`` (or ``resnet-backbone bench``) from the repository root; ``--help`` lists the
options. See README.md, "Performance".
"""

from .suite import main

__all__ = ["main"]
