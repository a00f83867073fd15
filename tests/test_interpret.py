"""Grad-CAM, test-time augmentation and the LR finder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lungbench.core.errors import UsageError
from lungbench.models import create_model
from lungbench.train.cam import cam_layer_name, grad_cam, stage_layer_for_size
from lungbench.train.lr_finder import LRRange, find_lr, lr_finder_figure
from lungbench.train.transfer import apply_method, parse_method
from lungbench.train.tta import tta_probabilities


class BrightnessNet(nn.Module):
    """Constructed: conv features equal to local brightness, logit = their mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:, 0, 1, 1] = 1.0
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(torch.eye(2)[:, :, None, None])
            self.conv2.bias.zero_()
            self.head.weight.fill_(1.0)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i],), self.y[i]


def test_cam_peaks_on_a_planted_bright_object():
    image = torch.rand(1, 1, 48, 48) * 0.05
    image[..., 30:36, 8:14] = 1.0
    model = BrightnessNet()
    assert cam_layer_name(model) == "conv2"  # the last convolution, chosen automatically
    cam = grad_cam(model, (image,))
    assert cam.shape == (1, 48, 48)
    row, col = divmod(int(cam[0].argmax()), 48)
    assert 30 <= row < 36 and 8 <= col < 14
    assert cam[0, 30:36, 8:14].mean() > 5 * cam[0, :20, 24:].mean()


class StagedBrightnessNet(BrightnessNet):
    """BrightnessNet described as a backbone, so the transfer methods can freeze it."""

    STAGES = (("conv1", ("conv1",)), ("conv2", ("conv2",)))
    HEAD = "head"


def test_cam_explains_a_frozen_layer():
    image = torch.rand(1, 1, 48, 48) * 0.05
    image[..., 30:36, 8:14] = 1.0
    model = StagedBrightnessNet()
    plan = apply_method(model, parse_method("A"))  # head only: conv1 and conv2 frozen
    assert plan.trainable == 3 and not model.conv2.weight.requires_grad
    cam = grad_cam(model, (image,))
    row, col = divmod(int(cam[0].argmax()), 48)
    assert 30 <= row < 36 and 8 <= col < 14
    assert cam[0, 30:36, 8:14].mean() > 5 * cam[0, :20, 24:].mean()
    assert not model.conv2.weight.requires_grad  # freezing left as it was
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_cam_shapes_for_the_backbones(name):
    model = create_model(name, in_channels=1, out_channels=3)
    model.train()
    cam = grad_cam(model, (torch.rand(2, 1, 64, 48),), target=2)
    assert cam.shape == (2, 64, 48) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert model.training  # mode restored


def test_small_crops_explain_the_deepest_stage_with_enough_cells():
    """ResNet's last stage sees a 64 px crop as 2x2 cells, which cannot point at the centre:
    min_size=7 explains the deepest stage of at least 7x7 cells instead (layer4 at 224 px,
    as Grad-CAM's own networks; layer2 at 64 px; the shallowest when none is that wide)."""
    model = create_model("resnet18", in_channels=1)
    assert stage_layer_for_size(model, (torch.rand(1, 1, 224, 224),), 7) == "layer4"
    assert stage_layer_for_size(model, (torch.rand(1, 1, 64, 64),), 7) == "layer2"
    assert stage_layer_for_size(model, (torch.rand(1, 1, 32, 32),), 7) == "layer1"
    assert stage_layer_for_size(BrightnessNet(), (torch.rand(1, 1, 8, 8),), 7) == "conv2"
    model.train()
    cam = grad_cam(model, (torch.rand(2, 1, 64, 64),), min_size=7)
    assert cam.shape == (2, 64, 64) and model.training


def test_negative_explains_the_other_class_of_a_one_logit_model():
    """A one-logit model's logit is evidence for its second class; `negative` explains minus
    it, per image: the planted object is evidence against a model whose logit is minus the
    brightness, so its map is found only when the first class is explained."""
    image = torch.rand(2, 1, 48, 48) * 0.05
    image[..., 30:36, 8:14] = 1.0
    model = BrightnessNet()
    with torch.no_grad():
        model.head.weight.fill_(-1.0)  # logit = -brightness
    cam = grad_cam(model, (image,), negative=[True, False])
    row, col = divmod(int(cam[0].argmax()), 48)
    assert 30 <= row < 36 and 8 <= col < 14  # image 0: the first class, found
    assert float(cam[1].max()) == 0.0  # image 1: no evidence for the second class anywhere


def test_cam_layer_override_and_bad_names():
    model = create_model("resnet18", in_channels=1)
    assert cam_layer_name(model) == "layer4"
    assert cam_layer_name(model, "layer3") == "layer3"
    with pytest.raises(UsageError, match="not a module"):
        cam_layer_name(model, "layer9")
    with pytest.raises(UsageError, match="out of range"):
        grad_cam(model, (torch.rand(1, 1, 32, 32),), target=4)


def test_tta_shapes_and_averaging():
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, out_channels=4).eval()
    x = torch.rand(3, 1, 32, 32)
    assert tta_probabilities(model, (x,), task="multilabel").shape == (3, 4)
    binary = BrightnessNet()
    # A mean over the image ignores orientation: TTA equals the plain prediction.
    plain = torch.sigmoid(binary(x)).reshape(-1)
    torch.testing.assert_close(tta_probabilities(binary, (x,), task="binary"), plain)
    with pytest.raises(UsageError, match="TTA view"):
        tta_probabilities(binary, (x,), views=("spin",))


def test_lr_finder_gives_a_finite_suggestion_and_restores_weights():
    torch.manual_seed(0)
    x = torch.rand(32, 1, 12, 12)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).float()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(400, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = find_lr(
        model, Pairs(x, y), LRRange(start_lr=1e-5, end_lr=1.0, num_iter=30), batch_size=8
    )
    assert math.isfinite(result.suggestion) and 1e-5 <= result.suggestion <= 1.0
    assert len(result.lrs) == len(result.smoothed) >= 6
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    lr_finder_figure(result).clear()
