"""mtl_vision: config-driven, distributed training for multi-task dense vision."""

__version__ = "0.1.0"
