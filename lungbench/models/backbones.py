"""Layer 4 (models): ResNet 18/34/50/101/152 and DenseNet121 for the transfer-learning studies (seeds 001, 004).

The networks are MONAI's (no torchvision needed), in 2D by default and 3D with
`spatial_dims=3`, with any number of outputs. Parameter names follow torchvision's for ResNet
(`conv1`, `layer1.0.conv1`, ..., `fc`) and MONAI's for DenseNet (`features.denseblock1...`,
`class_layers.out`), so a torchvision or MONAI state dict loads with little or no remapping
(see lungbench.train.weights).

Shapes: (B, in_channels, H, W) or (B, in_channels, D, H, W) -> logits (B, out_channels).

Every network here describes itself for lungbench.train.transfer and lungbench.train.cam:

    STAGES      ordered (name, module prefixes) of the backbone, input side first
    HEAD        prefix of the new classification layer (replaced for each target task)
    CAM_LAYER   module whose output Grad-CAM explains (the last full-width feature map)
    FREEZE_EXTRA  extra prefixes frozen with a stage boundary (reproduces Keras slicing)

`keras_compat=True` gives every ResNet convolution a bias, as Keras's ResNet50 has: with it
ResNet50 with 13 outputs has the 23,561,229 trainable parameters of seed 004's cost table.
Biases start at zero, so the network computes the same function as without them.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121 as MonaiDenseNet121
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from lungbench.core.errors import UsageError, positive_int
from lungbench.models.registry import register_model

# Small odd-sized examples keep the registry-wide model test fast (per sample: C, H, W).
EXAMPLE_2D = ((3, 33, 35),)

# block type and blocks per stage (conv2_x .. conv5_x), as in He et al. 2016, table 1.
RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
    "resnet152": (ResNetBottleneck, (3, 8, 36, 3)),
}


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


RESNET_DOCS = {
    "resnet18": "ResNet-18 (basic blocks 2-2-2-2), 11.2 M parameters with 1000 outputs.",
    "resnet34": "ResNet-34 (basic blocks 3-4-6-3).",
    "resnet50": "ResNet-50 (bottlenecks 3-4-6-3); keras_compat reproduces Keras's parameter count.",
    "resnet101": "ResNet-101 (bottlenecks 3-4-23-3).",
    "resnet152": "ResNet-152 (bottlenecks 3-8-36-3).",
}


def _register_resnet(name: str) -> None:
    """Register the builder `name` of RESNET_LAYOUTS (the registry names builders by their
    function name, and the CLI reads their keyword arguments, so each gets its own)."""
    block, layers = RESNET_LAYOUTS[name]

    def build(
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        keras_compat: bool = False,
        dropout: float = 0.0,
    ) -> ResNetClassifier:
        return ResNetClassifier(
            block,
            layers,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            keras_compat=keras_compat,
            dropout=dropout,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = RESNET_DOCS[name]
    register_model(inputs=EXAMPLE_2D)(build)


for _name in RESNET_LAYOUTS:
    _register_resnet(_name)


@register_model(inputs=EXAMPLE_2D)
def densenet121(
    spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 1, dropout: float = 0.0
) -> DenseNetClassifier:
    """DenseNet-121 (dense blocks 6-12-24-16, growth 32); 6,967,181 parameters with 13
    outputs, as in seed 004 (Keras's DenseNet convolutions have no biases either)."""
    return DenseNetClassifier(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout=dropout,
    )
