"""Convolution blocks shared by decoders."""

from __future__ import annotations

from torch import nn


class ConvBNReLU(nn.Sequential):
    """k x k convolution, batch norm, ReLU; 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def shortcut(in_channels: int, out_channels: int) -> nn.Module:
    """The skip path of a residual block: identity, or 1x1 convolution + BN when the width changes."""
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
