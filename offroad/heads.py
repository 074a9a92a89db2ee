"""Trainable segmentation heads on the backbone's patch-token maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DepthwiseConv(nn.Conv2d):
    """7x7 depthwise convolution, run in fp32 under autocast: memory-bound, so bf16 only adds casts (a CPU
    train step of it at batch 2: 2.6 ms in fp32, 5.1 ms in bf16)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 7, padding=3, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def convnext_block(channels: int) -> nn.Sequential:
    return nn.Sequential(DepthwiseConv(channels), nn.GELU(),
                         nn.Conv2d(channels, channels, 1), nn.GELU())


class ConvNeXtHead(nn.Module):
    """The report's head: 7x7 stem, one depthwise-separable block, 1x1 classifier, on the last layer's tokens."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 7, padding=3), nn.GELU())
        self.block = convnext_block(channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.block(self.stem(x)))


class MultiScaleHead(nn.Module):
    """Fuses the last `layers` blocks (per-layer 1x1 projection, 3x3 fusion), then adds blocks run at token,
    1/2 and 1/4 resolution so both fine detail and wide context reach the classifier."""

    def __init__(self, embed_dim: int, layers: int, channels: int, num_classes: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(layers * embed_dim, layers * channels, 1, groups=layers), nn.GELU())
        self.fuse = nn.Sequential(nn.Conv2d(layers * channels, channels, 3, padding=1), nn.GELU())
        self.local = convnext_block(channels)
        self.context = nn.ModuleList(nn.Sequential(nn.AvgPool2d(s, ceil_mode=True), convnext_block(channels))
                                     for s in (2, 4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fuse(self.project(x))
        size = x.shape[-2:]
        context = [F.interpolate(c(x), size=size, mode="bilinear", align_corners=False) for c in self.context]
        return self.classifier(x + self.local(x) + sum(context))
