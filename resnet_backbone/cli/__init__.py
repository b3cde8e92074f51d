"""The applications tier: the ``resnet-backbone`` command line and what only it uses (stage tables,
checkpoint conversion, the demo and its synthetic data, the fine-tuning loop, deployment exports).

It sits on top of the core and the adapters; nothing below imports it.
"""
