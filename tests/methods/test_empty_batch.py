"""The methods on an empty batch (B = 0): GASW/GDSW give weights of shape (0,) without counting a
step, GAGA counts no sample, GWA records nothing."""
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_gasw_and_gdsw_on_an_empty_batch():
    model = _model()
    engine = ga.PerSampleGradients(model)
    for weighting in (ga.GASW(2.0), ga.GDSW(1.0, leave_one_out=True)):
        stats = engine.backward(F.cross_entropy(model(torch.randn(0, 4)), torch.zeros(0, dtype=torch.long),
                                                reduction="none"), weights=weighting)
        assert stats.weights.shape == (0,) and weighting.steps == 0 and weighting.fallbacks == 0
        assert weighting.last_entropy == 1.0


def test_gaga_counts_no_sample_for_an_empty_batch():
    model = _model()
    engine = ga.PerSampleGradients(model)
    acc = ga.GSNRAccumulator(tau=1e9, increment=4, max_samples=8)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    assert not acc.update(engine.backward(F.cross_entropy(model(x), y, reduction="none"), write_grad=False))
    before = {n: t.clone() for n, t in acc.mean_grad().items()}
    assert not acc.update(engine.backward(F.cross_entropy(model(x[:0]), y[:0], reduction="none"), write_grad=False))
    assert acc.n == 4
    for n, t in acc.mean_grad().items():
        torch.testing.assert_close(t, before[n])


def test_gwa_records_nothing_for_an_empty_batch():
    model = _model()
    monitor = ga.GWAMonitor(model[2])
    logits = model(torch.randn(0, 4))
    monitor.update(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    logits = model(torch.randn(5, 4))
    monitor.update(logits, torch.randint(0, 3, (5,)), torch.arange(5))
    assert monitor.last_scores().shape == (5,)
    monitor.end_epoch()
    assert monitor.sample_scores()["sample_id"].shape == (5,)
    monitor.remove()
