"""Parameters frozen when the engine was made and unfrozen later (gradual unfreezing): served
from the first training forward in which they require grad, exactly; unfrozen too late: refused.
(Their p.grad used to stay None and every norm was off.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.compare import close


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def exact_step(engine, model, x, y, weights=None):
    """One engine step against torch.func over the parameters trainable now."""
    for p in model.parameters():
        p.grad = None
    w = None if weights is None else weights(x.shape[0])
    ref = ga.reference_statistics(model, x, y, ce, weights=w)
    stats = engine.backward(ce(model(x), y), weights=w)
    close(stats.norms, ref["norms"])
    close(stats.cosines, ref["cosines"], rtol=1e-3)
    for name, p in model.named_parameters():
        if p.requires_grad:
            close(p.grad, ref["weighted_grad" if w is not None else "mean_grad"][name])
        else:
            assert p.grad is None
    return stats


class ScaledMLP(nn.Module):
    """A raw parameter of the root (watched) and three Linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.layers = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.layers(x * self.scale)


def test_gradual_unfreezing_is_exact_at_every_stage():
    model = ScaledMLP()
    model.requires_grad_(False)
    model.layers[4].requires_grad_(True)                    # the head only
    engine = ga.PerSampleGradients(model)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g))
    exact_step(engine, model, *batch)
    model.layers[2].weight.requires_grad_(True)             # half a layer, then the rest of it
    exact_step(engine, model, *batch, weights=lambda B: torch.linspace(0.5, 2, B))
    model.layers[2].bias.requires_grad_(True)
    exact_step(engine, model, *batch)
    model.requires_grad_(True)                              # everything, the root's raw parameter too
    stats = exact_step(engine, model, *batch, weights=lambda B: torch.linspace(2, 0.5, B))
    assert set(stats.trainable_names) == {n for n, _ in model.named_parameters()}
    model.layers[0].requires_grad_(False)                   # and frozen again
    exact_step(engine, model, *batch)


def test_unfreezing_between_forward_and_backward_is_refused():
    model = ScaledMLP()
    model.layers[0].requires_grad_(False)
    engine = ga.PerSampleGradients(model)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    losses = ce(model(x), y)
    model.layers[0].requires_grad_(True)
    with pytest.raises(ga.GradAlignError, match=r"layers.0.weight, layers.0.bias became trainable after the forward"):
        engine.backward(losses)
    exact_step(engine, model, x, y)                         # the next forward serves them


def test_unfreezing_a_module_the_engine_cannot_serve_is_refused_at_the_forward():
    """A frozen train-mode BatchNorm is accepted (nothing to serve); unfrozen, it mixes samples."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    model[1].requires_grad_(False)
    engine = ga.PerSampleGradients(model)
    model[1].requires_grad_(True)
    with pytest.raises(ga.UnsupportedModuleError, match=r"1 \(BatchNorm1d\): BatchNorm in training mode"):
        model(torch.randn(6, 4))
    assert engine is not None
