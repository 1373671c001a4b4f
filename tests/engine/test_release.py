"""engine.backward(..., release=True): p.grad written a layer at a time, the last first, each
layer's per-sample factors freed once its part is written. p.grad must equal the kept path's
on every architecture; the statistics the weighting read stay, any other raises; the factors
(a layer's input activation) are really freed while the statistics object lives."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES, cross_entropy
from gradalign.errors import GradAlignError
from tests.support.layer_models import LAYER_ARCHITECTURES

ALL = {**ARCHITECTURES, **LAYER_ARCHITECTURES}


def _step(model, x, y, loss_fn, weights, release, grads_before=False):
    model = copy.deepcopy(model)
    if grads_before:  # p.grad accumulates: the released parts are added, as the kept ones
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(loss_fn(model(x), y), weights=weights, release=release)
    engine.remove()
    return stats, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", sorted(ALL))
@pytest.mark.parametrize("weighting", ["mean", "tensor", "gasw"])
def test_released_p_grad_equals_the_kept_one(arch, weighting):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ALL[arch]()
    x, y = make_batch(7, torch.Generator().manual_seed(1))
    weights = {"mean": lambda: None, "tensor": lambda: torch.rand(7) * 2,
               "gasw": lambda: ga.GASW(2.0)}[weighting]
    w = weights()
    kept_stats, kept = _step(model, x, y, loss_fn, w, release=False, grads_before=weighting == "tensor")
    w = weights() if weighting == "gasw" else w
    stats, released = _step(model, x, y, loss_fn, w, release=True, grads_before=weighting == "tensor")
    assert released.keys() == kept.keys()
    for name in kept:
        torch.testing.assert_close(released[name], kept[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(stats.weights, kept_stats.weights)
    if weighting == "gasw":  # read by GASW before p.grad was written: still there
        torch.testing.assert_close(stats.cosines, kept_stats.cosines)
        torch.testing.assert_close(stats.norms, kept_stats.norms)


def _mlp_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    return model, torch.randn(9, 12), torch.randint(0, 5, (9,))


def test_statistics_not_read_before_the_release_raise_with_the_fix():
    model, x, y = _mlp_batch()
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(cross_entropy(model(x), y), weights=lambda s: (1.0 / s.norms).clamp(max=1.0),
                            release=True)
    assert stats.norms.shape == (9,)  # read by the weighting
    for read in (lambda: stats.cosines, lambda: stats.grad_sum, lambda: stats.grad_sq_sum,
                 lambda: stats.dots({n: torch.zeros_like(p) for n, p in model.named_parameters()}),
                 lambda: stats.weighted_sum(None)):
        with pytest.raises(GradAlignError, match="without release=True"):
            read()


def test_release_without_writing_p_grad_is_refused():
    model, x, y = _mlp_batch()
    engine = ga.PerSampleGradients(model)
    with pytest.raises(ValueError, match="write_grad=False"):
        engine.backward(cross_entropy(model(x), y), write_grad=False, release=True)


@pytest.mark.parametrize("release", [False, True])
def test_the_factors_are_freed_while_the_statistics_live(release):
    """A hidden layer's input (a ReLU output nothing else holds) is a factor of the next Linear:
    kept with the statistics by default, gone after a released backward."""
    model, x, y = _mlp_batch()
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(weakref.ref(args[0].untyped_storage())))
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(cross_entropy(model(x), y), weights=ga.GASW(2.0), release=release)
    gc.collect()
    assert (seen[0]() is None) == release
    assert stats.weights.shape == (9,)


def test_each_layer_is_freed_before_the_earlier_layers_are_written():
    """The last layer first, as a plain backward: when the first Linear's p.grad is written, the
    factors of the later ones (here the middle Linear's input) are gone already."""
    model, x, y = _mlp_batch()
    seen, at_first_layer = [], []
    model[2].register_forward_hook(lambda m, args, out: seen.append(weakref.ref(args[0].untyped_storage())))
    engine = ga.PerSampleGradients(model)
    write = engine._write_grad

    def spy(grads, add):
        if "0.weight" in grads:
            gc.collect()
            at_first_layer.append(seen[0]() is None)
        write(grads, add=add)
    engine._write_grad = spy
    engine.backward(cross_entropy(model(x), y), weights=ga.GASW(2.0), release=True)
    assert at_first_layer == [True]
    assert model[0].weight.grad is not None and model[4].weight.grad is not None
