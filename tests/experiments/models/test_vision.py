"""The CIFAR models: sizes as the seeds' repositories give them, shapes, GVR's module groups,
options and their errors; the 1-D models' groups equal the earlier "last two Linears" rule."""
import pytest
import torch
from torch import nn

from gradalign.errors import ConfigError
from gradalign.experiments.models import MODELS_1D, build_model
from gradalign.experiments.models.vision import sincos_2d


def n_params(modules):
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


@pytest.mark.parametrize("kind, classes, total, last_stage", [
    ("resnet18", 100, 11_220_132, 8_445_028),      # the GVR repository's ResNet-18; conv5_x + fc
    ("vit", 10, 9_499_146, 1_584_138),            # ViT/CIFAR-4: last block + final norm + head
    ("convnext", 10, 8_437_706, 4_226_058),       # ConvNeXt-V2 Pico
])
def test_full_sizes(kind, classes, total, last_stage):
    model = build_model(kind, num_classes=classes)
    assert n_params([model]) == total
    groups = model.module_groups()
    assert groups["head"] == [model.head] and groups["last_stage"][-1] is model.head
    assert n_params(groups["last_stage"]) == last_stage


@pytest.mark.parametrize("kind, options", [
    ("resnet18", {"width": 4}),
    ("vit", {"width": 16, "depth": 2, "mlp_dim": 16, "heads": 2}),
    ("convnext", {"depths": [1, 1], "dims": [8, 16]}),
])
def test_narrow_models_train(kind, options):
    torch.manual_seed(0)
    model = build_model(kind, num_classes=7, **options)
    x = torch.randn(5, 3, 32, 32)
    out = model(x)
    assert out.shape == (5, 7) and isinstance(model.head, nn.Linear)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.channels_last == (kind != "vit")
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), out, rtol=1e-4, atol=1e-5)


def test_vit_head_starts_at_zero_and_positions_are_fixed():
    model = build_model("vit", num_classes=3, width=16, depth=1, mlp_dim=8, heads=2)
    assert model.head.weight.abs().sum() == 0 and "pos" not in model.state_dict()
    pe = sincos_2d(2, 3, 8)
    assert pe.shape == (6, 8) and torch.allclose(pe[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))


@pytest.mark.parametrize("kind", sorted(MODELS_1D))
def test_signal_model_groups_are_the_last_two_linears(kind):
    """The earlier heuristic of steps.py ("last_stage" = the last two nn.Linear), kept exactly."""
    for options in ({}, {"blocks": 0} if kind == "resmlp" else {}):
        model = build_model(kind, **options)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert model.module_groups()["last_stage"] == linears[-2:]
        assert model.module_groups()["head"] == [model.head]


@pytest.mark.parametrize("kind, kwargs, match", [
    ("resnet18", {"width": 0}, "width must be an int >= 1"),
    ("resnet18", {"blocks": [2, 0]}, "non-empty list of ints"),
    ("vit", {"head_zero_init": 1}, "true or false"),
    ("vit", {"width": 30, "heads": 4}, "divisible"),
    ("convnext", {"depths": [1], "dims": [8, 16]}, "same length"),
    ("convnext", {"hidden_size": 3}, "does not take hidden_size"),
])
def test_bad_options(kind, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(kind, **kwargs)
