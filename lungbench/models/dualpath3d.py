"""Layer 4 (models): The two-path 3D CNN of seed 000 (after Dey, Lu & Hong 2018, "Diagnostic classification
of lung nodules using 3D neural networks").

Two near-identical convolutional paths look at the same nodule: the *context* path sees a
large cube around it resampled onto the input grid, the *zoom* path a central crop at native
resolution on the same grid. Their pooled features are concatenated and classified.

Shapes: context (B, 1, *grid), zoom (B, 1, *zoom_grid) -> logits (B, out_channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lungbench.core.errors import positive_int
from lungbench.data.geometry import geometry
from lungbench.models.registry import register_model


def _pool_kernel(size: Sequence[int]) -> tuple[int, ...]:
    # Do not pool an axis that has already shrunk to 1 voxel or less than 2 (e.g. dey2018 depth).
    return tuple(2 if s >= 2 else 1 for s in size)


class ConvPath(nn.Module):
    """`depth` levels of Conv3d(3) -> BatchNorm -> ReLU -> MaxPool, width doubling per level,
    then global average pooling: (B, in_channels, *grid) -> (B, filters * 2**(depth-1)).

    A pooled level runs MaxPool before the ReLU: max and ReLU commute exactly (ReLU keeps
    the order of positive values and zeroes the rest), values and gradients included, and
    the ReLU then touches an eighth of the elements (ReLU forward + backward took 1.0 ms of
    the 17-20 ms default step on the dev box). The modules keep their indices (conv, BN,
    then pool and ReLU swapped), so checkpoints of either order load."""

    def __init__(self, in_channels: int, filters: int, depth: int, grid: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, list(grid)
        for level in range(depth):
            width = filters * 2**level
            layers += [
                nn.Conv3d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm3d(width),
            ]
            if level < depth - 1:
                kernel = _pool_kernel(size)
                layers.append(nn.MaxPool3d(kernel))
                size = [s // k for s, k in zip(size, kernel, strict=True)]
            layers.append(nn.ReLU(inplace=True))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class DualPath3D(nn.Module):
    """Two-path 3D CNN: context and zoom cubes -> concatenated features -> MLP head.

    Args:
        in_channels: channels per input cube (1 for CT).
        out_channels: logits (1 for benign/malignant with BCE).
        filters: base width; level i has filters * 2**i channels (the thesis times 8 and 16).
        depth: conv levels per path.
        context_grid / zoom_grid: spatial input shapes (D, H, W).
        hidden: width of the hidden layer of the head.
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        filters: int = 8,
        depth: int = 4,
        context_grid: Sequence[int] = (32, 32, 32),
        zoom_grid: Sequence[int] = (32, 32, 32),
        hidden: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        positive_int(filters, "filters")
        positive_int(depth, "depth")
        self.context_path = ConvPath(in_channels, filters, depth, context_grid)
        self.zoom_path = ConvPath(in_channels, filters, depth, zoom_grid)
        features = self.context_path.out_features + self.zoom_path.out_features
        self.head = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_channels),
        )

    def forward(self, context: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.context_path(context), self.zoom_path(zoom)], dim=1)
        return self.head(features)


def _cube_shapes(preset: str = "default", **_: Any) -> list[tuple[int, ...]]:
    """Per-sample (C, D, H, W) of the context and zoom cubes of a geometry preset."""
    geo = geometry(preset)
    return [(1, *geo.context_grid), (1, *geo.zoom_grid)]


@register_model(inputs=((1, 33, 34, 35), (1, 33, 34, 35)), shapes=_cube_shapes)
def dualpath3d(
    preset: str = "default",
    filters: int = 8,
    depth: int = 4,
    in_channels: int = 1,
    out_channels: int = 1,
    hidden: int = 64,
    dropout: float = 0.3,
) -> DualPath3D:
    """Seed 000's two-path nodule classifier on the grid of geometry `preset`."""
    geo = geometry(preset)
    return DualPath3D(
        in_channels, out_channels, filters, depth, geo.context_grid, geo.zoom_grid, hidden, dropout
    )
