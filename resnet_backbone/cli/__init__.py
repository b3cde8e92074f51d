"""The ``resnet-backbone`` command line: one module per verb (``add_arguments(parser)`` and ``run(args)``),
registered in ``main.VERBS``. Each verb parses its arguments and calls the core, the adapters or the
application package (``resnet_backbone.training``); the work itself lives there.

Nothing below imports it.
"""
