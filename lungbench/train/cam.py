"""Layer 9 (train): Grad-CAM (Selvaraju et al. 2017) for any of the networks: where the model looked.

    cam = grad_cam(model, (image,), target=0)        # (B, H, W) in [0, 1], input resolution
    cam = grad_cam(model, (images,), min_size=7, negative=probs < 0.5)   # small crops
    fig = cam_overlay_figure(images, cams, titles)

The explained layer is the network's `CAM_LAYER` (ResNet: `layer4`; DenseNet: `features.norm5`,
the last full-width feature maps) or, for any other model, its last convolution; `layer=`
overrides it with a module name. The map is ReLU(sum_c w_c A_c) with w_c the spatially
averaged gradient of the target logit with respect to the feature map A_c, upsampled to the
input and scaled to [0, 1] per image. Works for 2D (B, C, H, W) and 3D (B, C, D, H, W).

Small inputs: the last stage of a ResNet sees a 64-pixel crop as 2x2 cells (a 32-pixel one
as a single cell), and a map of 2x2 cells upsampled cannot point at the crop's centre, where
a nodule crop has its nodule: its peak lands in a corner, or the map is flat. `min_size=7`
explains instead the deepest backbone stage whose maps are at least 7 cells wide (the 7x7 of
Selvaraju et al.'s networks at 224 pixels): `layer4` at 224 pixels, `layer2` at 64.

A one-logit binary model's logit is the evidence for its second class; `negative` (one flag
per image) explains the first class instead (the negated logit), e.g. each image's
predicted class. Without it a benign-looking crop's map of "malignant" evidence is often
zero everywhere.
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


def stage_layer_for_size(model: nn.Module, inputs: Sequence[torch.Tensor], min_size: int) -> str:
    """The last module of the deepest backbone stage (`STAGES`, stem left out) whose output
    maps are at least `min_size` cells along every axis for `inputs`; the shallowest stage
    when none is; the model's usual CAM layer when it describes no stages."""
    stages = getattr(model, "STAGES", None)
    if not stages:
        return cam_layer_name(model)
    names = [prefixes[-1] for _, prefixes in stages[1:]]
    sizes: dict[str, tuple[int, ...]] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[2:]))
        )
        for name in names
    ]
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        with torch.no_grad():
            model(*(x[:1].to(device) for x in inputs))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    wide = [name for name in names if min(sizes.get(name, (0,))) >= min_size]
    return wide[-1] if wide else names[0]


def grad_cam(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    target: int = 0,
    layer: str | None = None,
    min_size: int | None = None,
    negative: torch.Tensor | Sequence[bool] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps (B, *spatial) in [0, 1] for output `target` (class or label index).

    `min_size`: explain the deepest backbone stage with maps at least that many cells wide
    (stage_layer_for_size) instead of the last one, unless `layer` names one. `negative`:
    per image, explain minus the target logit (a one-logit binary model's first class).
    The model is run in eval mode; its training mode and gradients are left as they were.
    Frozen layers (`requires_grad=False`) can be explained too. Inputs are moved to the
    model's device; the maps come back on the device of `inputs[0]`.
    """
    home = inputs[0].device
    if layer is None and min_size is not None:
        layer = stage_layer_for_size(model, inputs, min_size)
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
            sign = torch.ones(logits.shape[0], device=logits.device)
            if negative is not None:
                flags = torch.as_tensor(negative, dtype=torch.bool).reshape(-1).to(logits.device)
                sign = torch.where(flags, -sign, sign)
            # every image's logit depends on that image alone (eval mode): one backward
            # pass gives each its own gradient
            score = (logits[:, target] * sign).sum()
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
