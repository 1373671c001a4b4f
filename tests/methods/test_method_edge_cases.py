"""The methods' edge cases that used to give silently wrong numbers or unclear errors: option
types, multi-hot targets in GVR's closed form, parameters frozen or unfrozen in the middle of a
GAGA accumulation, states that do not load."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from gradalign.methods.gvr import GVR


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("method", [ga.GASW, ga.GDSW])
@pytest.mark.parametrize("value", ["no", 1, None, "False"])
def test_leave_one_out_must_be_a_bool(method, value):
    """leave_one_out="no" turned leave-one-out on (a truthy string)."""
    with pytest.raises(ValueError, match="leave_one_out must be True or False"):
        method(2.0, leave_one_out=value)


@pytest.mark.parametrize("state,match", [({}, "missing"), ({"steps": 3}, "missing"),
                                         ({"steps": 2, "fallbacks": 5}, "fallbacks <= steps")])
def test_weighting_state_that_does_not_fit_is_refused_clearly(state, match):
    """GASW.load_state_dict({}) raised KeyError: 'steps'."""
    with pytest.raises(ValueError, match=match):
        ga.GASW().load_state_dict(state)
    w = ga.GASW()
    w.load_state_dict({"steps": 5, "fallbacks": 2})
    assert (w.steps, w.fallbacks) == (5, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 10), nn.Tanh())
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("targets", ["multi_hot", "unnormalised"])
def test_gvr_closed_form_with_targets_that_do_not_sum_to_one(targets):
    """Multi-hot targets gave a closed-form penalty of 0.083 where autograd gives 0.065: the
    closed form took p - y for the gradient of CE, which is (sum_c y_c) p - y."""
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    y = (torch.rand(12, 4, generator=g) < 0.5).float() if targets == "multi_hot" else torch.rand(12, 4, generator=g) * 2
    results = {}
    for mode in ("autograd", "closed_form"):
        net = Net()
        gvr = GVR(3.0, layers=net.head, subset=8, mode=mode, generator=torch.Generator().manual_seed(3))
        total, info = gvr.loss(net, x1, x2, y)
        total.backward()
        results[mode] = info["penalty"], [p.grad.clone() for p in net.parameters()]
    assert results["closed_form"][0] == pytest.approx(results["autograd"][0], rel=1e-5)
    for a, b in zip(results["closed_form"][1], results["autograd"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gwa_alignment_with_multi_hot_targets_matches_autograd():
    """GWA shares the residual: its a_i uses the exact gradient of CE for any soft targets."""
    torch.manual_seed(0)
    W, z = torch.randn(4, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    y = (torch.rand(7, 4) < 0.5).double()
    y[:, 0] = 1.0  # at least one class per sample: no zero gradient
    logits = z @ W.T
    scores = ga.gwa_alignment(W, z, logits, y)
    for i in range(7):
        w = W.clone().requires_grad_()
        g = -torch.autograd.grad(F.cross_entropy((z[i:i + 1] @ w.T), y[i:i + 1]), w)[0]
        expected = (g * W).sum() / (g.norm() * W.norm())
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-9)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def two_increments(model, between):
    """GAGA over two increments of 3 samples (never stepping), `between()` run before the second;
    returns the accumulator and the two (x, y) batches."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 5, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    engine = ga.PerSampleGradients(model)
    acc = ga.GSNRAccumulator(tau=float("inf"), increment=3, max_samples=64)
    for k, (x, y) in enumerate(batches):
        if k == 1:
            between()
        acc.update(engine.backward(ce(model(x), y), write_grad=False))
    return acc, batches


def test_gaga_parameter_frozen_in_the_middle_of_an_accumulation():
    """A parameter frozen after the first of two increments of 3 samples got the sum of 3
    samples divided by 6; it now leaves the accumulation (it is not written), and the others'
    mean stays over all 6 samples."""
    model = mlp()
    acc, batches = two_increments(model, lambda: model[0].bias.requires_grad_(False))
    mean = acc.mean_grad()
    assert "0.bias" not in mean
    model[0].bias.requires_grad_(True)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    reference = ga.reference_gradients(model, x, y, ce)
    for name in ("0.weight", "2.weight", "2.bias"):
        torch.testing.assert_close(mean[name], reference[name].mean(0), rtol=1e-4, atol=1e-7)


def test_gaga_parameter_unfrozen_in_the_middle_of_an_accumulation():
    """A layer unfrozen before the second increment: its mean is over the 3 samples in which it
    was trainable (the engine picks it up), the others' over all 6; the SNR uses each one's count."""
    model = mlp()
    model[0].requires_grad_(False)
    acc, batches = two_increments(model, lambda: model[0].requires_grad_(True))
    mean = acc.mean_grad()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    everything = ga.reference_gradients(model, x, y, ce)
    second = ga.reference_gradients(model, *batches[1], ce)
    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(mean[name], everything[name].mean(0), rtol=1e-4, atol=1e-7)
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(mean[name], second[name].mean(0), rtol=1e-4, atol=1e-7)
    mean_sq, noise = 0.0, 0.0
    for name in everything:
        per = (second if name.startswith("0.") else everything)[name].double().flatten(1)
        n = per.shape[0]
        mean_sq += per.mean(0).square().sum().item()
        noise += per.var(0, unbiased=True).sum().item() / n
    assert acc.last_snr == pytest.approx((mean_sq - noise) / noise, rel=1e-4)


def test_gwa_monitor_state_loads_with_weights_only():
    """GWAMonitor.state_dict() held numpy arrays, which torch.load(weights_only=True) refuses."""
    model = Net()
    monitor = ga.GWAMonitor(model.head)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        monitor.update(model(x), y, torch.arange(8))
        monitor.end_epoch()
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = ga.GWAMonitor(model.head)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.epoch_scores, monitor.epoch_scores)
    for key, values in monitor.sample_scores().items():
        assert (restored.sample_scores()[key] == values).all()
    restored.load_state_dict({**state, "sample_ids": [t.numpy() for t in state["sample_ids"]],
                              "sample_scores": [t.numpy() for t in state["sample_scores"]]})  # arrays still load
    assert (restored.sample_scores()["score"] == monitor.sample_scores()["score"]).all()
