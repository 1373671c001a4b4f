"""GSNRAccumulator: the accumulated gradient, both SNR rules by an independent route, the cap."""
import math

import pytest
import torch

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES


def increments(n_increments, size, seed=0):
    torch.manual_seed(seed)
    model, make_batch, loss_fn = ARCHITECTURES["seed_mlp"]()
    gen = torch.Generator().manual_seed(seed)
    return model, loss_fn, [make_batch(size, gen) for _ in range(n_increments)]


def reference_snr(model, loss_fn, batches, rule, eps=1e-12):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    flat = torch.cat([g.flatten(1) for g in ga.reference_gradients(model, x, y, loss_fn).values()], 1).double()
    n = flat.shape[0]
    m, v = flat.mean(0), flat.var(0, unbiased=True)
    if rule == "per_sample":
        return (m.square() / (v + eps)).mean().item()
    noise = v.sum().item() / n
    return (m.square().sum().item() - noise) / noise


@pytest.mark.parametrize("rule", ["mean_snr", "per_sample"])
def test_snr_and_accumulated_gradient_match_reference(rule):
    model, loss_fn, batches = increments(3, 8)
    acc = ga.GSNRAccumulator(tau=float("inf"), increment=8, max_samples=64, rule=rule)
    engine = ga.PerSampleGradients(model)
    for k, (x, y) in enumerate(batches, start=1):
        assert not acc.update(engine.backward(loss_fn(model(x), y), write_grad=False))
        assert acc.last_snr == pytest.approx(reference_snr(model, loss_fn, batches[:k], rule), rel=1e-3)
    assert all(p.grad is None for p in model.parameters())   # statistics only: the accumulator writes nothing
    engine.set_grad(acc.mean_grad())
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    grads = ga.reference_gradients(model, x, y, loss_fn)
    for name, p in model.named_parameters():
        assert acc.mean_grad()[name].dtype == p.dtype
        torch.testing.assert_close(p.grad, grads[name].mean(0), rtol=1e-4, atol=1e-7)


def test_steps_when_rule_passes_and_resets():
    model, loss_fn, batches = increments(4, 8)
    acc = ga.GSNRAccumulator(tau=-math.inf, increment=8, max_samples=64)  # passes after the first increment
    engine = ga.PerSampleGradients(model)
    for x, y in batches:
        assert acc.update(engine.backward(loss_fn(model(x), y), write_grad=False))
    assert acc.samples_per_step == [8, 8, 8, 8]
    x, y = batches[-1]
    expected = ga.reference_gradients(model, x, y, loss_fn)
    for name, mean in acc.mean_grad().items():  # the last increment alone, not a sum over steps
        torch.testing.assert_close(mean, expected[name].mean(0), rtol=1e-4, atol=1e-7)


def test_cap_forces_a_step():
    model, loss_fn, batches = increments(5, 8)
    acc = ga.GSNRAccumulator(tau=math.inf, increment=8, max_samples=16)
    engine = ga.PerSampleGradients(model)
    ready = [acc.update(engine.backward(loss_fn(model(x), y))) for x, y in batches]
    assert ready == [False, True, False, True, False]
    assert acc.samples_per_step == [16, 16]


def test_zero_variance_means_exact_signal():
    model = torch.nn.Linear(2, 1, bias=False)
    x = torch.ones(4, 2)
    stats = ga.PerSampleGradients(model).backward(model(x).sum(1))  # identical per-sample gradients
    acc = ga.GSNRAccumulator(tau=1e9, increment=4, max_samples=64)
    assert acc.update(stats) and acc.last_snr == math.inf


def test_per_sample_rule_falls_as_samples_accumulate():
    """The pitfall of METHODS.md: the seed's per-sample GSNR shrinks towards r_j with n."""
    model, loss_fn, batches = increments(8, 32, seed=3)
    acc = ga.GSNRAccumulator(tau=math.inf, increment=32, max_samples=1024, rule="per_sample")
    engine = ga.PerSampleGradients(model)
    snrs = []
    for x, y in batches:
        acc.update(engine.backward(loss_fn(model(x), y)))
        snrs.append(acc.last_snr)
    assert snrs[-1] < snrs[0]


@pytest.mark.parametrize("kwargs,match", [({"rule": "magic"}, "rule"), ({"increment": 0}, "increment"),
                                          ({"max_samples": 4}, "max_samples"), ({"tau": float("nan")}, "tau"),
                                          ({"eps": -1e-3}, "eps"), ({"eps": float("nan")}, "eps")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ga.GSNRAccumulator(**kwargs)


def test_set_grad_replaces_and_refuses_unknown_names():
    model, loss_fn, batches = increments(1, 8)
    engine = ga.PerSampleGradients(model)
    engine.backward(loss_fn(model(batches[0][0]), batches[0][1]))     # p.grad = mean gradient
    zeros = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    engine.set_grad(zeros)
    for p in model.parameters():
        assert p.grad.dtype == p.dtype and not p.grad.any()
    zeros["0.weight"].fill_(1.0)                                      # the engine copied, p.grad is its own
    assert not model[0].weight.grad.any()
    with pytest.raises(KeyError, match="nope"):
        engine.set_grad({"nope": torch.zeros(1)})


def test_state_dict_mid_accumulation_resumes_exactly(tmp_path):
    """A checkpoint between two increments of one accumulation: the loaded accumulator takes
    the same decision and writes the same mean as the one that never stopped."""
    model, loss_fn, batches = increments(4, 8)
    engine = ga.PerSampleGradients(model)
    stats = [engine.backward(loss_fn(model(x), y), write_grad=False) for x, y in batches]
    acc = ga.GSNRAccumulator(tau=float("inf"), increment=8, max_samples=24)
    for s in stats[:2]:
        assert not acc.update(s)
    torch.save(acc.state_dict(), tmp_path / "acc.pt")
    resumed = ga.GSNRAccumulator(tau=float("inf"), increment=8, max_samples=24)
    resumed.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert resumed.update(stats[2]) and acc.update(stats[2])           # the cap, 24 samples, in both
    for name, g in acc.mean_grad().items():
        assert resumed.mean_grad()[name].dtype == g.dtype
        torch.testing.assert_close(resumed.mean_grad()[name], g, rtol=0, atol=0)
    assert resumed.samples_per_step == acc.samples_per_step == [24] and resumed.last_snr == acc.last_snr
    assert not resumed.update(stats[3]) and resumed.n == 8               # the next accumulation starts anew
