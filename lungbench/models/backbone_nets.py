"""Layer 4 (models): the MONAI networks behind lungbench.models.backbones (ResNet, DenseNet121).

Apart from the registry's builders so that importing lungbench.models does not import MONAI
(about 3.5 s): only a recipe that builds one of these networks pays for it.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121 as MonaiDenseNet121
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from lungbench.core.errors import UsageError, positive_int

BLOCKS: dict[str, type[nn.Module]] = {"basic": ResNetBlock, "bottleneck": ResNetBottleneck}


def _check_common(spatial_dims: int, in_channels: int, out_channels: int, dropout: float) -> None:
    if spatial_dims not in (2, 3):
        raise UsageError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    positive_int(in_channels, "in_channels")
    positive_int(out_channels, "out_channels")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")


class ResNetClassifier(MonaiResNet):
    """MONAI's ResNet with an ImageNet-style stem (7x7 stride 2 + max pool) and a
    dropout -> linear head (seed 004's modified classification layer).

    (B, C, H, W) -> stem (B, 64, H/4, W/4) -> conv2..conv5 -> (B, F, H/32, W/32)
    -> global average pool -> dropout -> fc -> (B, out_channels).
    """

    STAGES = (
        ("stem", ("conv1", "bn1")),
        ("conv2", ("layer1",)),
        ("conv3", ("layer2",)),
        ("conv4", ("layer3",)),
        ("conv5", ("layer4",)),
    )
    HEAD = "fc"
    CAM_LAYER = "layer4"
    FREEZE_EXTRA: dict[str, tuple[str, ...]] = {}

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, int, int, int],
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        keras_compat: bool = False,
        dropout: float = 0.0,
    ) -> None:
        _check_common(spatial_dims, in_channels, out_channels, dropout)
        super().__init__(
            block=block,
            layers=list(layers),
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            num_classes=out_channels,
            # Keras's shortcut convolutions have a bias too; _add_conv_biases adds it as zeros.
            bias_downsample=False,
        )
        if keras_compat:
            _add_conv_biases(self)
        self.head_dropout = nn.Dropout(dropout)
        self.keras_compat = keras_compat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.head_dropout(x))


def _add_conv_biases(model: nn.Module) -> None:
    """Give every bias-free convolution a zero bias (Keras layout; same function)."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_channels))


class DenseNetClassifier(MonaiDenseNet121):
    """MONAI's DenseNet121 with dropout before the output layer.

    (B, C, H, W) -> stem (B, 64, H/4, W/4) -> dense blocks 1..4 with transitions
    -> (B, 1024, H/32, W/32) -> ReLU -> global average pool -> dropout -> out.
    """

    STAGES = (
        ("stem", ("features.conv0", "features.norm0")),
        ("block1", ("features.denseblock1", "features.transition1")),
        ("block2", ("features.denseblock2", "features.transition2")),
        ("block3", ("features.denseblock3", "features.transition3")),
        ("block4", ("features.denseblock4", "features.norm5")),
    )
    HEAD = "class_layers.out"
    CAM_LAYER = "features.norm5"
    # Keras's `layers[55:]`, `[143:]`, `[315:]` (seed 004) start two layers into a dense
    # block: its first batch norm (and ReLU) stay frozen with everything before the block.
    FREEZE_EXTRA = {
        f"block{b}": (f"features.denseblock{b}.denselayer1.layers.norm1",) for b in (2, 3, 4)
    }

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        _check_common(spatial_dims, in_channels, out_channels, dropout)
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels
        )
        out = self.class_layers.out
        # Rebuild the head without in-place ReLU (Grad-CAM keeps the norm5 output) and with
        # dropout before `out`; the parameter names stay `class_layers.out.*`.
        self.class_layers = nn.Sequential()
        self.class_layers.add_module("relu", nn.ReLU())
        self.class_layers.add_module("pool", _global_pool(spatial_dims))
        self.class_layers.add_module("flatten", nn.Flatten(1))
        self.class_layers.add_module("dropout", nn.Dropout(dropout))
        self.class_layers.add_module("out", out)


def _global_pool(spatial_dims: int) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
