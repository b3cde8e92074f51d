"""``python -m resnet_backbone.cli VERB ...`` is ``resnet-backbone VERB ...`` (and what ``torchrun -m`` runs)."""

import sys

from .main import main

sys.exit(main())
