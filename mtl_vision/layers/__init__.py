"""Building blocks shared by decoders, one concept per file."""

from mtl_vision.layers.conv import ConvBNReLU

__all__ = ["ConvBNReLU"]
