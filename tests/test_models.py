"""The papers' models: shapes and parameter counts."""

import pytest
import torch

from fedvb.models import build_model


@pytest.mark.parametrize(
    "name, shape, params",
    [
        ("softmax", (1, 28, 28), 7840),
        ("mlp", (1, 28, 28), 784 * 200 + 200 + 200 * 100 + 100 + 100 * 10 + 10),
        ("zenke-cnn", (3, 32, 32), None),
        ("acar-cnn", (3, 32, 32), None),
        ("resnet20", (3, 32, 32), None),
    ],
)
def test_models_map_inputs_to_class_scores(name, shape, params):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_acar_cnn_layout_matches_feddyn():
    model = build_model("acar-cnn", (3, 32, 32), 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1600, 384), (384, 192), (192, 10)]


def test_resnet20_has_twenty_weight_layers_and_group_norm():
    model = build_model("resnet20", (3, 32, 32), 10)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 20
    assert all(g.num_groups == 2 for g in model.modules() if isinstance(g, torch.nn.GroupNorm))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_mlp_activation_is_configurable_and_checked():
    assert isinstance(build_model("mlp", (64,), 10, activation="relu")[2], torch.nn.ReLU)
    assert isinstance(build_model("mlp", (64,), 10)[2], torch.nn.Sigmoid)  # the papers' default
    with pytest.raises(ValueError, match="activation: unknown 'swish'; allowed: sigmoid, relu"):
        build_model("mlp", (64,), 10, activation="swish")
    with pytest.raises(ValueError, match="model: unknown 'vgg'"):
        build_model("vgg", (64,), 10)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("resnet20", (64,), 10)
