"""Every registered model: forward and backward on a small odd-sized input."""

from __future__ import annotations

import pytest
import torch

from lungbench.core.errors import UsageError
from lungbench.data.geometry import GEOMETRY_PRESETS, geometry
from lungbench.models import create_model, example_input_shapes, list_models


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
