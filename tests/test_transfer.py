"""Transfer methods A-D: seed 004's trainable-parameter counts, real freezing, weighted BCE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lungbench.core.errors import UsageError
from lungbench.models import create_model
from lungbench.train.losses import WeightedBCE, class_weights, weighted_bce_with_logits
from lungbench.train.transfer import (
    Method,
    apply_method,
    count_parameters,
    freeze_points,
    frozen_norm_layers,
    parse_method,
)

# Seed 004, "Computing resources when training ... on ChestX-ray8" (13 outputs).
SEED_COUNTS = {
    "resnet50": {
        "A": 26_637,
        "B_40": 15_002_637,
        "B_22": 22_111_245,
        "B_10": 23_334_413,
        "C": 23_561_229,
    },
    "densenet121": {
        "A": 13_325,
        "B_88": 2_172_429,
        "B_39": 5_537_037,
        "B_14": 6_589_069,
        "C": 6_967_181,
    },
}


@pytest.mark.parametrize("name", sorted(SEED_COUNTS))
def test_trainable_parameters_match_the_seed(name):
    kw = {"keras_compat": True} if name == "resnet50" else {}
    model = create_model(name, out_channels=13, **kw)
    for label, expected in SEED_COUNTS[name].items():
        plan = apply_method(model, parse_method(label))
        assert plan.trainable == expected, label
        assert count_parameters(model)[0] == expected
    plan = apply_method(model, parse_method("D"))
    assert plan.trainable == SEED_COUNTS[name]["C"] and plan.frozen == 0


def test_seed_layer_counts_name_the_stage_boundaries():
    assert freeze_points(create_model("resnet50")) == {
        "conv2": 1,
        "conv3": 10,
        "conv4": 22,
        "conv5": 40,
    }
    assert freeze_points(create_model("densenet121")) == {
        "block1": 1,
        "block2": 14,
        "block3": 39,
        "block4": 88,
    }
    model = create_model("resnet50")
    assert (
        apply_method(model, parse_method("B_conv5")).trainable
        == apply_method(model, parse_method("B_40")).trainable
    )


def test_densenet_b_also_freezes_the_blocks_first_batch_norm():
    model = create_model("densenet121", out_channels=13)
    apply_method(model, parse_method("B_88"))
    first = model.features.denseblock4.denselayer1.layers
    assert not first.norm1.weight.requires_grad and first.conv1.weight.requires_grad
    assert "features.denseblock4.denselayer1.layers.norm1" in frozen_norm_layers(model)


def test_frozen_parameters_and_bn_statistics_do_not_move():
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, out_channels=2)
    apply_method(model, Method("B", "conv4"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # what the training engine does every epoch
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(torch.rand(4, 1, 32, 32) * 3).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("conv1", "bn1", "layer1", "layer2"))]
    trained = [k for k in before if k.startswith(("layer3", "layer4", "fc"))]
    assert any("running_mean" in k for k in frozen)
    for key in frozen:
        torch.testing.assert_close(after[key], before[key], msg=key)
    assert any(not torch.equal(after[k], before[k]) for k in trained if "weight" in k)
    assert not model.layer1[0].bn1.training and model.layer3[0].bn1.training


def test_reapplying_a_method_releases_frozen_layers():
    model = create_model("resnet18")
    apply_method(model, parse_method("A"))
    apply_method(model, parse_method("C"))
    assert not frozen_norm_layers(model)
    model.train()
    model(torch.rand(2, 3, 32, 32))
    assert model.bn1.training


@pytest.mark.parametrize("bad", ["B_11", "B_conv9", "B_block2"])
def test_freeze_depth_the_network_does_not_have(bad):
    with pytest.raises(UsageError) as err:
        apply_method(create_model("resnet50"), parse_method(bad))
    assert "conv5 (40 layers)" in str(err.value)


@pytest.mark.parametrize("bad", ["E", "B", "A_3"])
def test_bad_method_names(bad):
    with pytest.raises(UsageError):
        parse_method(bad)


def test_weighted_bce_against_a_hand_computed_value():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 0]])
    beta_p, beta_n = class_weights(labels)
    # Label 0: |P| = 1, |N| = 3 -> beta_P = 4, beta_N = 4/3; label 1 the same.
    torch.testing.assert_close(beta_p, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(beta_n, torch.tensor([4 / 3, 4 / 3]))
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    # beta_P * -ln(sigmoid(0)) + beta_N * -ln(1 - sigmoid(2))
    expected = 4 * math.log(2) + 4 / 3 * math.log(1 + math.exp(2))
    total = weighted_bce_with_logits(logits, target, beta_p, beta_n, reduction="sum")
    assert total.item() == pytest.approx(expected, rel=1e-6)
    mean = WeightedBCE(beta_p, beta_n)(logits, target)
    assert mean.item() == pytest.approx(expected / 2, rel=1e-6)


def test_weighted_bce_dataset_counts_differ_from_per_label_counts():
    """Seed 004 counts |P| and |N| over all labels of the data set (the default here)."""
    labels = np.array([[1, 1], [0, 1], [0, 1], [0, 0]])  # label 0: 1 of 4; label 1: 3 of 4
    beta_p, beta_n = class_weights(labels, per_label=False)  # |P| = 4, |N| = 4 of 8
    torch.testing.assert_close(beta_p, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(beta_n, torch.tensor([2.0, 2.0]))
    per_p, per_n = class_weights(labels, per_label=True)
    torch.testing.assert_close(per_p, torch.tensor([4.0, 4 / 3]))
    torch.testing.assert_close(per_n, torch.tensor([4 / 3, 4.0]))
    assert chestxray_default_is_dataset_counts()


def chestxray_default_is_dataset_counts() -> bool:
    from lungbench.cli import build_parser
    from lungbench.commands.train.chestxray import make_config

    args = build_parser().parse_args(["train", "chestxray", "--quick"])
    return make_config(args).per_label_weights is False  # --class-weights dataset


def test_weighted_bce_global_counts_and_binary_shapes():
    labels = np.array([1, 0, 0, 0, 0])
    beta_p, beta_n = class_weights(labels, per_label=False)
    assert beta_p.item() == pytest.approx(5.0) and beta_n.item() == pytest.approx(5 / 4)
    loss = WeightedBCE.from_labels(labels)
    assert torch.isfinite(loss(torch.zeros(3, 1), torch.tensor([1.0, 0.0, 0.0])))


def test_lungbench_checkpoints_are_read_by_the_training_reader(tmp_path):
    # weights.read_weights_file hands lungbench checkpoints to train.load_checkpoint, so a
    # checkpoint from a newer lungbench is refused the same way in both places.
    from lungbench.core.errors import DataError
    from lungbench.train.checkpoint import CHECKPOINT_VERSION, save_checkpoint
    from lungbench.train.weights import read_weights_file, under

    model = torch.nn.Linear(2, 1)
    ok = save_checkpoint(tmp_path / "ok.pt", {"model": model.state_dict(), "model_name": "m"})
    wfile = read_weights_file(ok)
    assert wfile.kind == "lungbench-checkpoint" and wfile.model_name == "m"
    assert set(wfile.state) == {"weight", "bias"}
    newer = tmp_path / "newer.pt"
    torch.save(
        {"format": "lungbench-checkpoint", "version": CHECKPOINT_VERSION + 1, "model": {}}, newer
    )
    with pytest.raises(DataError, match="is newer than this lungbench reads"):
        read_weights_file(newer)
    assert under("fc.weight", ["fc"]) and not under("fc2.weight", ["fc"])
