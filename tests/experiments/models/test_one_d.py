"""build_model: kinds, sizes, heads, options, and compatibility with the engine."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from gradalign.errors import ConfigError
from gradalign.experiments.models import MODELS_1D, build_model

KINDS = sorted(MODELS_1D)          # the image models: tests/test_vision_models.py


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_seed_mlp_parameter_count():
    model = build_model("mlp")
    assert n_params(model) == 78_858                                # 40-256-256-10
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 256), (256, 256), (256, 10)]
    assert linears[-1] is model.head


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 7])
def test_output_shape_and_head(kind, batch):
    torch.manual_seed(0)
    model = build_model(kind)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert model.head.in_features == 256
    assert model(torch.randn(batch, 40)).shape == (batch, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_other_sizes(kind):
    model = build_model(kind, input_dim=33, num_classes=4, hidden=16)
    assert model(torch.randn(3, 33)).shape == (3, 4) and model.head.in_features == 16


@pytest.mark.parametrize("kind", KINDS)
def test_no_batchnorm_no_inplace(kind):
    for m in build_model(kind).modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
        assert not getattr(m, "inplace", False)


def test_kind_options():
    small = build_model("resmlp", hidden=8, blocks=1, layer_norm=False)
    assert not any(isinstance(m, nn.LayerNorm) for m in small.modules())
    assert n_params(small) == (40 * 8 + 8) + (8 * 8 + 8) * 2 + (8 * 10 + 10)
    assert sum(isinstance(m, nn.LayerNorm) for m in build_model("resmlp", blocks=3).modules()) == 3
    conv = build_model("conv1d", channels=16, groups=4, hidden=8)
    assert [m.out_channels for m in conv.modules() if isinstance(m, nn.Conv1d)] == [16, 16]
    assert sum(isinstance(m, nn.GroupNorm) for m in conv.modules()) == 2


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ConfigError, match="mlp, resmlp, conv1d"):
        build_model("transformer")


@pytest.mark.parametrize("kind, kwargs, match", [
    ("mlp", {"blocks": 2}, "does not take blocks"),
    ("conv1d", {"layer_norm": True}, "channels, groups"),
    ("mlp", {"hidden": 0}, "hidden"),
    ("mlp", {"input_dim": 2.5}, "input_dim"),
    ("resmlp", {"blocks": -1}, "blocks"),
    ("conv1d", {"channels": 30, "groups": 8}, "divisible"),
])
def test_bad_options(kind, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(kind, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_accepts_every_kind(kind):
    """The per-sample gradient engine hooks every layer; norms match one-at-a-time autograd."""
    torch.manual_seed(0)
    model = build_model(kind, hidden=16, **({"channels": 8, "groups": 4} if kind == "conv1d" else {}))
    x, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    engine.remove()
    expected = []
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        expected.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    assert torch.allclose(stats.norms, torch.stack(expected), rtol=1e-4, atol=1e-6)
