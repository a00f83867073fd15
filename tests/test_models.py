"""Every registered model: forward and backward on a small odd-sized input."""

from __future__ import annotations

import pytest
import torch

from lungbench.core.errors import UsageError
from lungbench.data.geometry import GEOMETRY_PRESETS, geometry
from lungbench.models import create_model, example_input_shapes, input_shapes, list_models


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name)
    inputs = [torch.randn(shape) for shape in example_input_shapes(name, batch=2)]
    out = model(*inputs)
    assert out.shape[0] == 2
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_model_lists_known_names():
    with pytest.raises(UsageError) as err:
        create_model("dualpath")
    message = str(err.value)
    assert "dualpath3d" in message and "did you mean" in message


def test_unknown_option_is_named():
    with pytest.raises(UsageError, match="no option 'filtres'"):
        create_model("dualpath3d", filtres=8)


@pytest.mark.parametrize("preset", sorted(GEOMETRY_PRESETS))
def test_dualpath_presets_accept_their_grid(preset):
    geo = geometry(preset)
    model = create_model("dualpath3d", preset=preset, filters=4, depth=3).eval()
    out = model(torch.randn(2, 1, *geo.context_grid), torch.randn(2, 1, *geo.zoom_grid))
    assert out.shape == (2, 1)


def test_filters_set_the_width():
    small = create_model("dualpath3d", filters=8)
    big = create_model("dualpath3d", filters=16)
    assert small.context_path.out_features == 8 * 2**3
    assert big.context_path.out_features == 16 * 2**3
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())


def test_paths_are_separate_and_both_used():
    torch.manual_seed(0)
    model = create_model("dualpath3d", filters=4, depth=2).eval()
    context, zoom = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)
    base = model(context, zoom)
    assert not torch.allclose(base, model(context * 0, zoom))
    assert not torch.allclose(base, model(context, zoom * 0))


@pytest.mark.parametrize("bad", [{"filters": 0}, {"depth": 0}, {"preset": "nope"}])
def test_bad_options(bad):
    with pytest.raises(UsageError):
        create_model("dualpath3d", **bad)


def _relu_before_pool(model):
    """The same modules in the thesis's order: ReLU, then MaxPool (ConvPath runs the pool
    first: the two commute)."""
    for path in (model.context_path, model.zoom_path):
        mods = list(path.features)
        pools = [i for i, m in enumerate(mods) if isinstance(m, torch.nn.MaxPool3d)]
        for i in pools:
            mods[i], mods[i + 1] = mods[i + 1], mods[i]
        path.features = torch.nn.Sequential(*mods)
    return model


@pytest.mark.parametrize("preset", ["default", "dey2018"])
def test_pooling_before_the_relu_gives_the_same_values_and_gradients(preset):
    """Max and ReLU commute, so the pooled levels' cheaper order is the same network: the
    same logits and weight gradients, bit for bit, as ReLU -> MaxPool; and a state dict of
    one order loads into the other (the modules keep their indices)."""
    torch.manual_seed(0)
    new = create_model("dualpath3d", preset=preset, filters=2)
    old = _relu_before_pool(create_model("dualpath3d", preset=preset, filters=2))
    old.load_state_dict(new.state_dict())
    assert [type(m).__name__ for m in new.context_path.features][:4] == [
        "Conv3d", "BatchNorm3d", "MaxPool3d", "ReLU",
    ]  # fmt: skip
    inputs = [torch.randn(s) for s in input_shapes("dualpath3d", 2, preset=preset, filters=2)]
    grads = []
    for model in (new, old):
        model.train().zero_grad()
        torch.manual_seed(1)  # the head's dropout: the same mask for both
        out = model(*[x.clone() for x in inputs])
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))
