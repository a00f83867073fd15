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

from typing import TYPE_CHECKING

from lungbench.models.registry import register_model

if TYPE_CHECKING:
    from lungbench.models.backbone_nets import DenseNetClassifier, ResNetClassifier

# The networks (MONAI's) live in lungbench.models.backbone_nets, imported by the builders
# when a network is built: registering them here must not import MONAI (~3.5 s).

# Small odd-sized examples keep the registry-wide model test fast (per sample: C, H, W).
EXAMPLE_2D = ((3, 33, 35),)

# block type (backbone_nets.BLOCKS) and blocks per stage (conv2_x .. conv5_x), as in He et
# al. 2016, table 1.
RESNET_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


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
        from lungbench.models.backbone_nets import BLOCKS, ResNetClassifier

        return ResNetClassifier(
            BLOCKS[block],
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
    from lungbench.models.backbone_nets import DenseNetClassifier

    return DenseNetClassifier(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout=dropout,
    )
