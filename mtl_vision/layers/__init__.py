"""Building blocks shared by decoders, one concept per file."""

from mtl_vision.layers.conv import ConvBNReLU, shortcut

__all__ = ["ConvBNReLU", "shortcut"]
