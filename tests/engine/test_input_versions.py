"""Statistics read after the caller changed a layer input in place (engine/guards/inputs.py): the
model's own inputs are copied once the backward is done, so a refilled input buffer changes
nothing (it changed the norms by 45% and grad_sq_sum by 300%); with release=True, which reads
every statistic inside the backward, no copy is made; any input changed in place before the
backward, and any other kept input changed after it, is refused."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.compare import close
from tests.support.dispatch import Counts


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("make", [mlp, Tokens])
def test_refilling_the_input_buffer_after_backward_changes_no_statistic(make):
    model = make()
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(6, 8, generator=g) if make is mlp else torch.randint(0, 20, (6, 4), generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    weights = torch.linspace(0.5, 2, 6)
    ref = ga.reference_statistics(model, batch, y, ce, weights=weights)
    buffer = batch.clone()                                          # the loader's pinned buffer
    stats = ga.PerSampleGradients(model).backward(ce(model(buffer), y))
    buffer.copy_(torch.randn(6, 8) if make is mlp else torch.randint(0, 20, (6, 4)))  # the next batch
    close(stats.norms, ref["norms"])
    close(stats.cosines, ref["cosines"], rtol=1e-3)
    for name, expected in ref["grad_sq_sum"].items():
        close(stats.grad_sq_sum[name], expected)
        close(stats.weighted_sum(weights, factor=1 / 6)[name], ref["weighted_grad"][name])


class KeepsScaled(nn.Module):
    """Keeps the scaled input its first layer reads (not the model's input itself, and not saved
    by autograd for the engine's backward), which is then changed in place."""

    def __init__(self, change_in_forward=False):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 5), nn.Linear(5, 3)
        self.change_in_forward = change_in_forward

    def forward(self, x):
        self.scaled = x * 2
        out = self.l2(torch.tanh(self.l1(self.scaled)))
        if self.change_in_forward:
            self.scaled.add_(1.0)                                   # after l1 kept it
        return out


def test_another_kept_input_changed_in_place_after_backward_is_refused_when_read():
    model = KeepsScaled()
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    stats = ga.PerSampleGradients(model).backward(ce(model(x), y))
    norms = stats.norms                                             # read before: kept
    model.scaled.mul_(3.0)
    assert stats.norms is norms
    with pytest.raises(ga.GradAlignError, match=r"an input of l1 was modified in place after the backward"):
        stats.grad_sq_sum  # noqa: B018


def test_a_kept_input_changed_in_place_before_the_backward_is_refused():
    model = KeepsScaled(change_in_forward=True)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    with pytest.raises(ga.GradAlignError, match=r"an input of l1 was modified in place between its forward and this "
                                                r"backward .*out-of-place"):
        ga.PerSampleGradients(model).backward(ce(model(x), y))


@pytest.mark.parametrize("release, copies", [(False, 1), (True, 0)])
def test_the_model_input_is_copied_only_where_the_statistics_outlive_the_backward(release, copies):
    model, buffer, y = mlp(), torch.randn(6, 8), torch.randint(0, 3, (6,))
    engine, seen = ga.PerSampleGradients(model), {}

    def weights(stats):
        seen["norms"] = stats.norms
        return torch.ones(6)
    ref = ga.reference_statistics(model, buffer.clone(), y, ce)
    with Counts(lambda func, args: func is torch.ops.aten.clone.default) as clones:
        stats = engine.backward(ce(model(buffer), y), weights=weights, release=release)
    assert clones.count == copies
    buffer.copy_(torch.randn(6, 8))                                 # the next batch, after the backward
    close(seen["norms"], ref["norms"])
    close(stats.norms, ref["norms"])


@pytest.mark.parametrize("release", [False, True])
def test_a_model_input_refilled_before_the_backward_is_refused(release):
    """Never a statistic of the refilled values: autograd refuses first (a layer whose per-sample gradients
    read its input saves it for its weight gradient), else the engine's version check would."""
    model, buffer, y = mlp(), torch.randn(6, 8), torch.randint(0, 3, (6,))
    losses = ce(model(buffer), y)
    buffer.copy_(torch.randn(6, 8))                                 # refilled too early
    with pytest.raises((ga.GradAlignError, RuntimeError), match=r"modified (by an inplace operation|in place)"):
        ga.PerSampleGradients(model).backward(losses, release=release)
