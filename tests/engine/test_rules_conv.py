"""Conv3d and ConvTranspose1d/2d/3d rules against the torch.func reference; the N-d unfold."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.engine_models import ARCHITECTURES, classification_batch, cross_entropy
from gradalign.engine.representations import Dense, Factored
from gradalign.engine.rules.conv import unfold, unfold_by_dim
from tests.support.layer_models import LAYER_ARCHITECTURES
from tests.support.compare import compare_all


CONV_ARCHITECTURES = {**{a: ARCHITECTURES[a] for a in ("conv1d", "conv2d_groupnorm")},
                      **{a: f for a, f in LAYER_ARCHITECTURES.items() if a.startswith("conv")}}


@pytest.fixture(params=["auto", "ghost", "dense"])
def route(request, monkeypatch):
    """Each layer's own choice, or every convolution forced onto the ghost route (unfolded
    factors) or the dense one (per-sample gradients from one grouped weight-gradient call)."""
    if request.param != "auto":
        for module in ("conv", "conv_transpose"):
            monkeypatch.setattr(f"gradalign.engine.rules.{module}.ghost_is_cheaper",
                                lambda *sizes, ghost=request.param == "ghost": ghost)
    return request.param


@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("arch", sorted(a for a in LAYER_ARCHITECTURES if a.startswith("conv")))
def test_every_statistic_matches_torch_func(arch, B):
    torch.manual_seed(0)
    model, make_batch, loss_fn = LAYER_ARCHITECTURES[arch]()
    compare_all(model, make_batch, loss_fn, B)


@pytest.mark.parametrize("arch", sorted(CONV_ARCHITECTURES))
def test_both_routes_on_every_convolution(arch, route):
    torch.manual_seed(0)
    model, make_batch, loss_fn = CONV_ARCHITECTURES[arch]()
    stats = compare_all(model, make_batch, loss_fn, B=7)
    modules = dict(model.named_modules())
    conv_weights = [g for n, g in stats._per_sample.items()
                    if n.endswith(".weight") and isinstance(modules[n[:-len(".weight")]], nn.modules.conv._ConvNd)]
    expected = {"ghost": Factored, "dense": Dense}.get(route, (Factored, Dense))
    assert conv_weights and all(isinstance(g, expected) for g in conv_weights)


@pytest.mark.parametrize("channels,length", [(1, 40), (12, 3)])
def test_conv_transpose_ghost_and_materialised_routes(channels, length):
    # (1, 40): T (n_in + n_out) > n_in n_out -> materialised; (12, 3): ghost route
    torch.manual_seed(3)
    model = nn.Sequential(nn.ConvTranspose1d(channels, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(4 * (2 * length + 1), 3))
    compare_all(model, classification_batch(channels, length, classes=3), cross_entropy, B=6)


@pytest.mark.parametrize("n", [1, 2])
def test_unfold_by_dim_matches_f_unfold(n):
    # the Tensor.unfold route that serves 3-D, against F.unfold (the 1-D and 2-D route)
    x = torch.randn(2, 3, *(7, 6)[:n], generator=torch.Generator().manual_seed(n))
    config = (3, 2)[:n], (2, 1)[:n], (1, 2)[:n], (2, 3)[:n]  # kernel, dilation, padding, stride
    torch.testing.assert_close(unfold_by_dim(x, *config), unfold(x, *config))


def test_unfold_3d_reproduces_conv3d():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 5, 6, 7, generator=gen), torch.randn(4, 3, 2, 3, 2, generator=gen)
    cols = unfold(x, (2, 3, 2), (2, 1, 3), (1, 0, 2), (1, 2, 2))  # (B, C k, *out)
    out = torch.einsum("ok,bk...->bo...", w.flatten(1), cols)
    torch.testing.assert_close(out, F.conv3d(x, w, stride=(1, 2, 2), padding=(1, 0, 2), dilation=(2, 1, 3)))


def test_unbatched_input_is_refused():
    import gradalign as ga
    model = nn.Conv3d(2, 2, 1)
    engine = ga.PerSampleGradients(model)
    with pytest.raises(ValueError, match=r"batched input \(B, C, D, H, W\)"):
        engine.backward(model(torch.randn(2, 3, 3, 3)).flatten(1).sum(1))


def test_conv3d_and_transposed_convs_have_native_rules():
    import gradalign as ga
    from gradalign.engine.rules.conv import conv_rule
    from gradalign.engine.rules.conv_transpose import conv_transpose_rule
    registry = ga.default_registry()
    assert registry.rule_for(nn.Conv3d(1, 1, 1)).compute is conv_rule
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        assert registry.rule_for(cls(1, 1, 1)).compute is conv_transpose_rule
