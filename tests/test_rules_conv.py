"""Conv3d and ConvTranspose1d/2d/3d rules against the torch.func reference; the N-d unfold."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_models import classification_batch, cross_entropy
from gradalign.engine.rules.conv import unfold, unfold_by_dim
from test_engine import compare_all


class Conv3dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv3d(4, 3, 2, padding="same", padding_mode="replicate", bias=False)
        self.head = nn.Linear(3, classes)

    def forward(self, x):  # (B, 2, 4, 6, 5)
        h = torch.tanh(self.c2(F.relu(self.gn(self.c1(x)))))
        return self.head(h.mean(dim=(2, 3, 4)))


class ConvTranspose1dNet(nn.Module):
    """stride + output_padding; then dilation with output_padding >= stride (extra positions)."""

    def __init__(self, classes=3):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose1d(4, 6, 3, padding=2, output_padding=1, dilation=2, groups=2)
        self.head = nn.Linear(6 * 11, classes)

    def forward(self, x):  # (B, 3, 5) -> (B, 4, 10) -> (B, 6, 11)
        return self.head(torch.tanh(self.up2(F.relu(self.up1(x)))).flatten(1))


class ConvTranspose2dNet(nn.Module):
    """groups, per-dimension stride, padding, dilation, and an output_size given at the call."""

    def __init__(self, classes=3):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (B, 4, 3, 4) -> (B, 6, 6, 6)
        h = self.up(x, output_size=[6, 6])
        return self.head(F.relu(h).mean(dim=(2, 3)))


class ConvTranspose3dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.up = nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False)
        self.down = nn.Conv3d(3, 2, 3, stride=2)
        self.head = nn.Linear(2, classes)

    def forward(self, x):  # (B, 2, 2, 3, 2) -> (B, 3, 4, 6, 4) -> (B, 2, 1, 2, 1)
        return self.head(self.down(F.relu(self.up(x))).flatten(2).mean(-1))


CONV_ARCHITECTURES = {
    "conv3d": lambda: (Conv3dNet(), classification_batch(2, 4, 6, 5, classes=3), cross_entropy),
    "conv_transpose1d": lambda: (ConvTranspose1dNet(), classification_batch(3, 5, classes=3), cross_entropy),
    "conv_transpose2d": lambda: (ConvTranspose2dNet(), classification_batch(4, 3, 4, classes=3), cross_entropy),
    "conv_transpose3d": lambda: (ConvTranspose3dNet(), classification_batch(2, 2, 3, 2, classes=3), cross_entropy),
}


@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("arch", sorted(CONV_ARCHITECTURES))
def test_every_statistic_matches_torch_func(arch, B):
    torch.manual_seed(0)
    model, make_batch, loss_fn = CONV_ARCHITECTURES[arch]()
    compare_all(model, make_batch, loss_fn, B)


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
