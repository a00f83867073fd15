"""The 2D/3D ResNet and DenseNet backbones and loading weights from local files."""

from __future__ import annotations

import pytest
import torch

from lungbench.core.errors import DataError, UsageError
from lungbench.models import create_model
from lungbench.train.weights import load_weights, read_weights_file, weights_chain


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
@pytest.mark.parametrize("out_channels", [1, 13])
def test_any_head_size_2d(name, out_channels):
    model = create_model(name, in_channels=1, out_channels=out_channels).eval()
    assert model(torch.rand(2, 1, 40, 36)).shape == (2, out_channels)


def test_3d_variant():
    model = create_model("resnet18", spatial_dims=3, in_channels=1, out_channels=2).eval()
    assert model(torch.rand(1, 1, 16, 32, 32)).shape == (1, 2)


def test_bad_spatial_dims_is_a_usage_error():
    with pytest.raises(UsageError, match="spatial_dims"):
        create_model("resnet18", spatial_dims=4)


def test_keras_compat_adds_zero_biases_that_change_nothing(tmp_path):
    torch.manual_seed(0)
    plain = create_model("resnet18", out_channels=3).eval()
    keras = create_model("resnet18", out_channels=3, keras_compat=True).eval()
    assert sum(p.numel() for p in keras.parameters()) > sum(p.numel() for p in plain.parameters())
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    report = load_weights(keras, path, keep_head=True)
    assert report.missing_ok and all(k.endswith(".bias") for k in report.missing_ok)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(keras(x), plain(x))


def test_torchvision_densenet_names_are_remapped(tmp_path):
    torch.manual_seed(0)
    source = create_model("densenet121", out_channels=5).eval()
    # torchvision's layout: no ".layers." inside dense layers, old-style "norm.1", "classifier".
    tv = {}
    for key, value in source.state_dict().items():
        key = key.replace(".layers.", ".").replace("class_layers.out.", "classifier.")
        key = key.replace("denselayer1.norm1.", "denselayer1.norm.1.")
        tv[key] = value
    path = tmp_path / "densenet121-tv.pth"
    torch.save(tv, path)
    target = create_model("densenet121", out_channels=5).eval()
    load_weights(target, path, keep_head=True)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(target(x), source(x))


def test_rgb_weights_load_into_a_grey_network(tmp_path):
    rgb = create_model("resnet18", in_channels=3)
    path = tmp_path / "rgb.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.state_dict().items()}}, path)
    grey = create_model("resnet18", in_channels=1, out_channels=4)
    report = load_weights(grey, path)
    assert report.adapted and report.skipped_head == ("fc.weight", "fc.bias")
    torch.testing.assert_close(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))


def test_weights_of_another_network_list_mismatched_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(create_model("resnet18").state_dict(), path)
    with pytest.raises(UsageError) as err:
        load_weights(create_model("resnet34"), path)
    message = str(err.value)
    assert "r18.pt" in message and "missing from the file" in message and "layer" in message


def test_densenet_weights_into_resnet_fail_clearly(tmp_path):
    path = tmp_path / "dn.pt"
    torch.save(create_model("densenet121").state_dict(), path)
    with pytest.raises(UsageError, match="not in the model"):
        load_weights(create_model("resnet18"), path)


def test_checkpoint_chain_is_extended(tmp_path):
    model = create_model("resnet18", out_channels=2)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "format": "lungbench-checkpoint",
            "version": 1,
            "model_name": "resnet18",
            "model": model.state_dict(),
            "weights_chain": ["imagenet.pth"],
        },
        path,
    )
    assert read_weights_file(path).model_name == "resnet18"
    assert weights_chain(path) == ["imagenet.pth", str(path)]
    report = load_weights(create_model("resnet18", out_channels=7), path)
    assert report.chain == ("imagenet.pth", str(path))
    with pytest.raises(UsageError, match="holds model 'resnet18'"):
        load_weights(create_model("resnet18"), path, expected_model="resnet34")


def test_missing_or_garbage_weights_file(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        load_weights(create_model("resnet18"), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a tensor file")
    with pytest.raises(DataError, match="bad.pth"):
        load_weights(create_model("resnet18"), bad)
