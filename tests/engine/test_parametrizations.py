"""Weights computed from other parameters (engine/recording/parametrized.py; which parameters:
engine/validate.py): torch's parametrizations and the older pre-hook reparametrizations, served
through the module's rule and the original parameters, against a per-sample autograd loop (they
used to fail with KeyError: 'weight')."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import gradalign as ga
from tests.support.compare import close


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(0, 1)


def build(kind):
    torch.manual_seed(0)
    if kind in ("conv_spectral_norm", "conv_old_spectral_norm"):
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        apply = parametrizations.spectral_norm if kind == "conv_spectral_norm" else nn.utils.spectral_norm
        apply(model[0])
        return model, torch.randn(7, 2, 6, 6)
    if kind == "embedding_weight_norm":
        model = nn.Sequential(nn.Embedding(12, 5), nn.Flatten(), nn.Linear(15, 3))
        parametrizations.weight_norm(model[0])
        return model, torch.randint(0, 12, (7, 3))
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)      # nn.utils.weight_norm is deprecated
        {"weight_norm": lambda m: parametrizations.weight_norm(m[0]),
         "orthogonal": lambda m: parametrizations.orthogonal(m[0]),
         "symmetric": lambda m: parametrize.register_parametrization(m[0], "weight", Symmetric()),
         "two_parametrized": lambda m: (parametrizations.weight_norm(m[0]), parametrizations.weight_norm(m[2])),
         "old_weight_norm": lambda m: nn.utils.weight_norm(m[2]),
         "pruned": lambda m: prune.l1_unstructured(m[0], "weight", amount=0.4)}[kind](model)
    return model, torch.randn(7, 6)


def loop_reference(model, x, y, weights):
    """Per-sample gradients by one backward per sample of one forward; the model's state (a
    spectral norm's power-iteration vectors) restored afterwards, so the engine's forward is the same."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses = ce(model(x), y)
    rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
            for i in range(len(losses))]
    model.load_state_dict(state)
    grads = {n: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
             for j, (n, p) in enumerate(params.items())}
    return ga.engine.reference.statistics_of(grads, weights)


KINDS = ["weight_norm", "orthogonal", "symmetric", "two_parametrized", "old_weight_norm", "pruned",
         "conv_spectral_norm", "conv_old_spectral_norm", "embedding_weight_norm"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_parametrized_weights_are_exact_through_their_original_parameters(kind, training):
    model, x = build(kind)
    model.train(training)
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(0.5, 2.0, x.shape[0])
    assert ga.validate(model) == []
    engine = ga.PerSampleGradients(model)
    for w in (None, weights):
        ref = loop_reference(model, x, y, w)
        for p in model.parameters():
            p.grad = None
        stats = engine.backward(ce(model(x), y), weights=w)
        close(stats.norms, ref["norms"])
        close(stats.cosines, ref["cosines"], rtol=1e-3)
        for name, p in model.named_parameters():
            if p.requires_grad:
                close(p.grad, ref["mean_grad" if w is None else "weighted_grad"][name])
                close(stats.grad_sq_sum[name], ref["grad_sq_sum"][name])


def test_gasw_on_a_parametrized_model_matches_the_loop():
    model, x = build("weight_norm")
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(1))
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(ce(model(x), y), weights=ga.GASW(2.0), release=True)
    ref = loop_reference(model, x, y, stats.weights)
    for name, p in model.named_parameters():
        close(p.grad, ref["weighted_grad"][name])
