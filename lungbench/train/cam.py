"""Layer 7 (train): Grad-CAM (Selvaraju et al. 2017) for any of the networks: where the model looked.

    cam = grad_cam(model, (image,), target=0)        # (B, H, W) in [0, 1], input resolution
    fig = cam_overlay_figure(images, cams, titles)

The explained layer is the network's `CAM_LAYER` (ResNet: `layer4`; DenseNet: `features.norm5`,
the last full-width feature maps) or, for any other model, its last convolution; `layer=`
overrides it with a module name. The map is ReLU(sum_c w_c A_c) with w_c the spatially
averaged gradient of the target logit with respect to the feature map A_c, upsampled to the
input and scaled to [0, 1] per image. Works for 2D (B, C, H, W) and 3D (B, C, D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungbench.core.errors import UsageError


def cam_layer_name(model: nn.Module, layer: str | None = None) -> str:
    """The module Grad-CAM explains: `layer`, else the model's CAM_LAYER, else its last conv."""
    names = dict(model.named_modules())
    convs = [n for n, m in names.items() if isinstance(m, nn.modules.conv._ConvNd)]
    if layer is not None:
        if not layer or layer not in names:
            raise UsageError(
                f"CAM layer {layer!r} is not a module of {type(model).__name__}; "
                f"its last convolution layers: {', '.join(convs[-3:])}"
            )
        return layer
    if getattr(model, "CAM_LAYER", None) in names:
        return model.CAM_LAYER
    if not convs:
        raise UsageError(f"{type(model).__name__} has no convolution layer for Grad-CAM")
    return convs[-1]


def grad_cam(
    model: nn.Module, inputs: Sequence[torch.Tensor], target: int = 0, layer: str | None = None
) -> torch.Tensor:
    """Grad-CAM maps (B, *spatial) in [0, 1] for output `target` (class or label index).

    The model is run in eval mode; its training mode and gradients are left as they were.
    Frozen layers (`requires_grad=False`) can be explained too. Inputs are moved to the
    model's device; the maps come back on the device of `inputs[0]`.
    """
    home = inputs[0].device
    module = model.get_submodule(cam_layer_name(model, layer))
    saved: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        # A leaf that requires grad even when the layer is frozen (transfer method A/B), or
        # when the input does not: the rest of the network runs on it, so autograd.grad
        # reaches it. Cloned downstream: an in-place op after this layer must not change
        # the saved map.
        activation = output.detach().requires_grad_(True)
        saved["activation"] = activation
        return activation.clone()

    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    handle = module.register_forward_hook(hook)
    model.eval()
    try:
        with torch.enable_grad():
            inputs = tuple(x.detach().to(device) for x in inputs)
            logits = model(*inputs)
            if logits.ndim == 1:
                logits = logits[:, None]
            if not 0 <= target < logits.shape[1]:
                raise UsageError(
                    f"CAM target {target} out of range: the model has {logits.shape[1]} outputs"
                )
            score = logits[:, target].sum()
            gradient = torch.autograd.grad(score, saved["activation"])[0]
    finally:
        handle.remove()
        model.train(was_training)
    activation = saved["activation"].detach()
    spatial = tuple(range(2, activation.ndim))
    weights = gradient.mean(dim=spatial, keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    mode = "bilinear" if cam.ndim == 4 else "trilinear"
    cam = F.interpolate(cam, size=inputs[0].shape[2:], mode=mode, align_corners=False)[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scale = (hi - lo).clamp_min(1e-12)
    shape = (-1, *([1] * (cam.ndim - 1)))
    return ((cam - lo.view(shape)) / scale.view(shape)).to(home)


def cam_overlay_figure(
    images: np.ndarray,
    cams: np.ndarray,
    titles: Sequence[str] | None = None,
    columns: int = 4,
    alpha: float = 0.45,
):
    """Grey images (N, H, W) with their CAMs (N, H, W) as a 'jet' overlay; a figure per grid."""
    import matplotlib.pyplot as plt

    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0)
        ax.imshow(cams[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig
