"""Framework adapters, installed as ``resnet_backbone.adapters`` (one module per framework)."""
