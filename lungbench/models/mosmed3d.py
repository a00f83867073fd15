"""Layer 4 (models): The MosMed 3D CNN of seed 002 (Keras example "3D image classification from CT scans").

Baseline, as in Keras: four levels of Conv3d(k3, valid) + ReLU -> MaxPool3d(2) -> BatchNorm
with 64, 64, 128, 256 filters, global average pooling, Dense 512 + ReLU, Dropout 0.3 and one
output logit. On the 128x128x64 input it has 1,352,897 parameters as Keras counts them
(1,351,873 trainable in PyTorch + 1,024 BatchNorm running statistics).

The seed's six modifications are the `variant` option:

    dense100       an extra Dense 100 + ReLU before the output
    double_conv    a second convolution at each level
    sigmoid        sigmoid instead of ReLU activations everywhere
    avgpool        average pooling instead of max pooling
    residual       each convolution replaced by a residual block
    res_inception  each convolution replaced by a residual inception block

Shapes: volume (B, in_channels, D, H, W) -> logits (B, out_channels). With the default valid
padding each spatial axis needs at least 46 voxels; padding="same" accepts any size >= 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lungbench.core.errors import UsageError, look_up_option, positive_int
from lungbench.models.registry import register_model

VARIANTS = (
    "baseline",
    "dense100",
    "double_conv",
    "sigmoid",
    "avgpool",
    "residual",
    "res_inception",
)
KERAS_FILTERS = (64, 64, 128, 256)
KERAS_INPUT = (64, 128, 128)  # (D, H, W) of Keras's 128x128x64 volumes


def _act(variant: str) -> nn.Module:
    return nn.Sigmoid() if variant == "sigmoid" else nn.ReLU(inplace=True)


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with a shortcut (1x1x1 projection when widths differ):
    (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        return self.act(y + self.shortcut(x))


class ResidualInceptionBlock(nn.Module):
    """Inception-ResNet-A style block: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 branches,
    concatenated, mixed by a 1x1 conv and added to the (projected) input:
    (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        b = max(1, out_channels // 4)  # branch width: keeps the block near one 3x3 conv's size

        def conv(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True))

        self.branch1 = conv(in_channels, b, 1)
        self.branch3 = nn.Sequential(conv(in_channels, b, 1), conv(b, b, 3))
        self.branch33 = nn.Sequential(conv(in_channels, b, 1), conv(b, b, 3), conv(b, b, 3))
        self.mix = nn.Conv3d(3 * b, out_channels, 1)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.branch1(x), self.branch3(x), self.branch33(x)], dim=1)
        return self.act(self.mix(y) + self.shortcut(x))


def _level(variant: str, cin: int, cout: int, padding: str) -> nn.Sequential:
    """One level: the convolution(s) of `variant`, then pool (2) and BatchNorm, as Keras."""
    if variant == "residual":
        convs: list[nn.Module] = [ResidualBlock(cin, cout)]
    elif variant == "res_inception":
        convs = [ResidualInceptionBlock(cin, cout)]
    else:
        pad = 0 if padding == "valid" else 1
        convs = [nn.Conv3d(cin, cout, 3, padding=pad), _act(variant)]
        if variant == "double_conv":
            # The second conv pads "same": two valid convs per level would shrink the
            # 64-slice axis of the Keras input to nothing by the fourth level.
            convs += [nn.Conv3d(cout, cout, 3, padding=1), _act(variant)]
    pool = nn.AvgPool3d(2) if variant == "avgpool" else nn.MaxPool3d(2)
    return nn.Sequential(*convs, pool, nn.BatchNorm3d(cout))


class MosMed3D(nn.Module):
    """The seed-002 classifier: (B, in_channels, D, H, W) -> (B, out_channels) logits.

    Args:
        variant: baseline or one of the six modifications (see the module docstring).
        filters: widths of the conv levels (Keras: 64, 64, 128, 256).
        dense: width of the hidden dense layer (Keras: 512).
        dropout: dropout before the output layer(s) (Keras: 0.3).
        padding: "valid" as Keras, or "same" for small inputs (residual variants always pad).
    """

    def __init__(
        self,
        variant: str = "baseline",
        in_channels: int = 1,
        out_channels: int = 1,
        filters: Sequence[int] = KERAS_FILTERS,
        dense: int = 512,
        dropout: float = 0.3,
        padding: str = "valid",
    ) -> None:
        super().__init__()
        look_up_option(variant, VARIANTS, what="mosmed3d variant")
        look_up_option(padding, ("valid", "same"), what="padding")
        if not filters:
            raise UsageError("filters: give at least one level width")
        widths = [positive_int(f, "filters") for f in filters]
        levels, cin = [], in_channels
        for cout in widths:
            levels.append(_level(variant, cin, cout, padding))
            cin = cout
        self.features = nn.Sequential(*levels)
        self.pool = nn.AdaptiveAvgPool3d(1)
        head: list[nn.Module] = [nn.Linear(cin, dense), _act(variant), nn.Dropout(dropout)]
        if variant == "dense100":
            head += [nn.Linear(dense, 100), nn.ReLU(inplace=True)]
        head.append(nn.Linear(100 if variant == "dense100" else dense, out_channels))
        self.head = nn.Sequential(*head)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(volume)), 1))


def keras_parameter_count(model: nn.Module) -> int:
    """Parameters as Keras's model.summary() counts them: BatchNorm statistics included."""
    stats = sum(
        b.numel()
        for name, b in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    )
    return sum(p.numel() for p in model.parameters()) + stats


@register_model(inputs=((1, 46, 47, 48),))
def mosmed3d(
    variant: str = "baseline",
    in_channels: int = 1,
    out_channels: int = 1,
    filters: Sequence[int] = KERAS_FILTERS,
    dense: int = 512,
    dropout: float = 0.3,
    padding: str = "valid",
) -> MosMed3D:
    """Seed 002's MosMed 3D CNN (Keras example) or one of its six modifications."""
    return MosMed3D(variant, in_channels, out_channels, tuple(filters), dense, dropout, padding)
