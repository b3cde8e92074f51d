"""The application package behind ``resnet-backbone train``, ``evaluate`` and ``demo``: reading the user's data
(``data``), task models (``task_model``), the DDP fine-tuning loop (``engine``), held-out evaluation
(``evaluation``), one run per output folder (``run_folder``) and the demo's pipeline (``demo``).

It uses the core and the adapters; the command line (``resnet_backbone.cli``) calls it, and nothing here
imports the command line.
"""
