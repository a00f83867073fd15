"""The MosMed 3D CNN of seed 002 and its six modifications."""

from __future__ import annotations

import pytest
import torch

from lungbench.core.errors import UsageError
from lungbench.models import create_model
from lungbench.models.mosmed3d import VARIANTS, keras_parameter_count


def test_baseline_matches_keras_parameter_count():
    model = create_model("mosmed3d")
    # Keras model.summary() of the "3D image classification from CT scans" example.
    assert keras_parameter_count(model) == 1_352_897
    assert sum(p.numel() for p in model.parameters()) == 1_352_897 - 2 * (64 + 64 + 128 + 256)


def test_baseline_takes_the_keras_input():
    model = create_model("mosmed3d").eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 128, 128)).shape == (1, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_forward_backward(variant):
    torch.manual_seed(0)
    model = create_model(
        "mosmed3d", variant=variant, filters=(4, 4, 8, 8), dense=16, padding="same"
    )
    out = model(torch.randn(2, 1, 17, 18, 19))
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_variants_change_the_network():
    counts = {v: keras_parameter_count(create_model("mosmed3d", variant=v)) for v in VARIANTS}
    assert counts["dense100"] == counts["baseline"] + 512 * 100 + 100 + 100 - 512
    assert counts["double_conv"] > counts["baseline"]
    assert counts["sigmoid"] == counts["avgpool"] == counts["baseline"]
    sig = create_model("mosmed3d", variant="sigmoid")
    assert any(isinstance(m, torch.nn.Sigmoid) for m in sig.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in sig.modules())
    avg = create_model("mosmed3d", variant="avgpool")
    assert not any(isinstance(m, torch.nn.MaxPool3d) for m in avg.modules())


@pytest.mark.parametrize("bad", [{"variant": "resnet"}, {"padding": "full"}, {"filters": ()}])
def test_bad_options(bad):
    with pytest.raises(UsageError):
        create_model("mosmed3d", **bad)
