"""GASW / GDSW: hand-checked formulas, degenerate steps, leave-one-out, against torch.func."""
from types import SimpleNamespace

import pytest
import torch

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES, recording_engine
from gradalign.engine.representations import Factored
from gradalign.methods import leave_one_out_cosines, normalised_entropy


def fake_stats(cosines, mean_sq=1.0):
    cosines = torch.tensor(cosines)
    return SimpleNamespace(batch_size=len(cosines), cosines=cosines, norms=torch.ones(len(cosines)),
                           mean_grad_sq_norm=torch.tensor(mean_sq))


def test_gasw_by_hand():
    w = ga.GASW(gamma=2.0)(fake_stats([1.0, 0.5, -0.5, 0.0]))
    # raw = [1, 0.25, 0, 0], sum 1.25, times B/sum = 4/1.25
    torch.testing.assert_close(w, torch.tensor([3.2, 0.8, 0.0, 0.0]))


def test_gdsw_by_hand():
    w = ga.GDSW(gamma=1.0)(fake_stats([1.0, 0.5, -0.5, 0.0]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 1.5, 1.0]) * 4 / 3)


def test_weights_sum_to_batch_size_and_record_diagnostics():
    gasw = ga.GASW(gamma=1.0)
    w = gasw(fake_stats([0.9, 0.1, -0.3, 0.2, 0.4]))
    assert w.sum().item() == pytest.approx(5.0)
    assert gasw.last_zero_fraction == pytest.approx(0.2)
    assert 0 < gasw.last_entropy < 1
    assert gasw.steps == 1 and gasw.fallbacks == 0


@pytest.mark.parametrize("cosines,mean_sq", [([-0.2, -0.9, -0.1], 1.0),   # every s_i <= 0
                                             ([0.5, 0.5, 0.1], 0.0),      # gbar = 0
                                             ([float("nan"), 0.3, 0.2], 1.0)])
def test_degenerate_steps_fall_back_to_uniform(cosines, mean_sq):
    gasw = ga.GASW(gamma=2.0)
    w = gasw(fake_stats(cosines, mean_sq))
    torch.testing.assert_close(w, torch.ones(3))
    assert gasw.fallbacks == 1 and gasw.last_entropy == pytest.approx(1.0)


def test_gdsw_all_aligned_falls_back():
    gdsw = ga.GDSW(gamma=2.0)
    torch.testing.assert_close(gdsw(fake_stats([1.0, 1.0])), torch.ones(2))
    assert gdsw.fallbacks == 1


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), "2"])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ga.GASW(gamma=gamma)


def test_entropy():
    assert normalised_entropy(torch.ones(8)) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([4.0, 0, 0, 0])) == pytest.approx(0.0, abs=1e-9)


# At B = 48 the seed MLP's 40x256 and 256x256 layers take the Gram route (the residual MLP's do
# not: its 32x48 and 48x48 layers take it only below B = 39 and 48; many_positions forms its
# per-sample gradients once for the cosine terms), and leave-one-out reads <g_i, gbar> before |g_i|^2: the norms come from the Gram diagonal.
@pytest.mark.parametrize("arch", ["residual_mlp", "seed_mlp", "many_positions"])
@pytest.mark.parametrize("method", [ga.GASW, ga.GDSW])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_weighted_update_matches_torch_func(method, leave_one_out, arch):
    """Weights and update against cosines (to the mean, or leave-one-out to the mean of the
    others) computed from the materialised per-sample gradients."""
    torch.manual_seed(0)
    model, make_batch, loss_fn = ARCHITECTURES[arch]()
    x, y = make_batch(48, torch.Generator().manual_seed(0))
    grads = ga.reference_gradients(model, x, y, loss_fn)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1).double()
    B = flat.shape[0]
    reference = (B * flat.mean(0) - flat) / (B - 1) if leave_one_out else flat.mean(0).expand_as(flat)
    cos = torch.nn.functional.cosine_similarity(flat, reference, dim=1)
    raw = cos.clamp_min(0).pow(1.5) if method is ga.GASW else (1 - cos).pow(1.5)
    expected_w = (raw * B / raw.sum()).float()
    engine, record = recording_engine(model)
    stats = engine.backward(loss_fn(model(x), y), weights=method(gamma=1.5, leave_one_out=leave_one_out))
    gram = [n for n, calls in record.items() if isinstance(calls[0], Factored) and calls[0].uses_gram()]
    assert gram == (["0.weight", "2.weight"] if arch == "seed_mlp" else [])
    torch.testing.assert_close(stats.weights, expected_w, rtol=1e-3, atol=1e-4)
    for name, p in model.named_parameters():
        expected = torch.tensordot(expected_w, grads[name], dims=1) / B
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-6)


def test_leave_one_out_of_a_single_sample_is_zero():
    stats = SimpleNamespace(batch_size=1, norms=torch.ones(1), sq_norms=torch.ones(1),
                            dots_with_mean=torch.ones(1), mean_grad_sq_norm=torch.tensor(1.0))
    assert leave_one_out_cosines(stats).tolist() == [0.0]
