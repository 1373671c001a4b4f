"""GWA: alignment against autograd per-sample gradients, the epoch score against scipy,
guards, the monitor's table and hook, and the early-stopping rules on hand-made sequences."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from gradalign.errors import GradAlignError
from gradalign.methods.gwa import GWAMonitor, gwa_alignment, gwa_score


def autograd_alignment(W, b, z, targets):
    """a_i from g_i = -d CE_i / dW, computed one sample at a time by autograd."""
    out = []
    for i in range(z.shape[0]):
        Wr = W.detach().double().clone().requires_grad_(True)
        loss = F.cross_entropy((z[i:i + 1].double() @ Wr.T + b.double()), targets[i:i + 1].double()
                               if targets.is_floating_point() else targets[i:i + 1])
        g = -torch.autograd.grad(loss, Wr)[0]
        denom = g.norm() * Wr.norm()
        out.append((g * Wr).sum() / denom if denom > 0 else torch.zeros((), dtype=torch.float64))
    return torch.stack(out).detach()


def head_batch(B=7, C=4, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    z = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return W, b, z, z @ W.T + b, y


def test_alignment_by_hand_sign_convention():
    # C=2, D=1, W = [[1], [-1]], z = 1: the negative gradient of a correct label points along W.
    W, z = torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0]])
    logits = z @ W.T
    assert gwa_alignment(W, z, logits, torch.tensor([0])).item() == pytest.approx(1.0)
    assert gwa_alignment(W, z, logits, torch.tensor([1])).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("B", [1, 2, 7])
def test_alignment_matches_autograd_per_sample(B):
    W, b, z, logits, y = head_batch(B=B)
    a = gwa_alignment(W, z, logits, y)
    assert a.dtype == torch.float64 and a.shape == (B,)
    torch.testing.assert_close(a, autograd_alignment(W, b, z, y), rtol=1e-6, atol=1e-6)


def test_soft_labels_match_autograd_and_one_hot_equals_hard():
    W, b, z, logits, y = head_batch(B=6, C=3)
    soft = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(gwa_alignment(W, z, logits, soft), autograd_alignment(W, b, z, soft),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gwa_alignment(W, z, logits, F.one_hot(y, 3).float()),
                               gwa_alignment(W, z, logits, y))


def test_zero_head_and_zero_gradient_give_zero():
    W, b, z, logits, y = head_batch()
    assert torch.equal(gwa_alignment(torch.zeros_like(W), z, logits, y), torch.zeros(7, dtype=torch.float64))
    perfect = torch.tensor([[100.0, -100.0]])                 # p = y up to float64: g_i = 0
    assert gwa_alignment(torch.ones(2, 1), torch.zeros(1, 1), perfect, torch.tensor([0])).item() == 0.0


def test_alignment_rejects_bad_shapes():
    W, b, z, logits, y = head_batch()
    with pytest.raises(ValueError, match="logits"):
        gwa_alignment(W, z, logits[:, :3], y)
    with pytest.raises(ValueError, match="targets"):
        gwa_alignment(W, z, logits, y[:3])


def test_score_matches_scipy_kurtosis():
    a = torch.randn(500, generator=torch.Generator().manual_seed(3)).double() * 0.2 + 0.3
    x = a.numpy()
    expected = x.mean() / (scipy.stats.kurtosis(x, fisher=True, bias=True) + 1.2)
    assert gwa_score(a) == pytest.approx(expected, rel=1e-12)
    assert gwa_score(a.float()) == pytest.approx(expected, rel=1e-5)


def test_score_guards():
    assert math.isnan(gwa_score(torch.tensor([-1.0, 1.0, -1.0, 1.0])))   # kurt = -2: denominator -0.8
    assert math.isnan(gwa_score(torch.zeros(5)))                          # kurtosis undefined
    assert math.isnan(gwa_score(torch.full((5,), 0.1)))
    with pytest.raises(ValueError):
        gwa_score(torch.zeros(0))


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def data(B=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 6, generator=g), torch.randint(0, 3, (B,), generator=g)


def test_monitor_uses_pre_update_weights_and_records_table():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    monitor = GWAMonitor(net.head)
    expected_ids, expected_scores = [], []
    for epoch in range(2):
        for step in range(2):
            x, y = data(seed=10 * epoch + step)
            ids = torch.arange(10) + 10 * step
            logits = net(x)
            F.cross_entropy(logits, y).backward()
            W_before = net.head.weight.detach().clone()
            ref = gwa_alignment(W_before, net.body(x).detach(), logits.detach(), y)
            monitor.update(logits, y, ids)
            opt.step()
            opt.zero_grad()
            scores = monitor.last_scores()                   # after the step: from what update() kept
            torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-6)
            after = gwa_alignment(net.head.weight.detach(), net.body(x).detach(), logits.detach(), y)
            assert not torch.allclose(scores, after)          # the step moved W: the test can tell
            expected_ids.append(ids)
            expected_scores.append(ref)
        assert monitor.end_epoch() == pytest.approx(gwa_score(torch.cat(expected_scores[-2:])))
    table = monitor.sample_scores()
    np.testing.assert_array_equal(table["sample_id"], torch.cat(expected_ids).numpy())
    np.testing.assert_array_equal(table["epoch"], np.repeat([0, 1], 20))
    np.testing.assert_allclose(table["score"], torch.cat(expected_scores).numpy(), rtol=1e-5, atol=1e-6)
    assert len(monitor.epoch_scores) == len(monitor.epoch_mean_alignment) == 2
    assert monitor.epoch_mean_alignment[1] == pytest.approx(torch.cat(expected_scores[2:]).mean().item())
    assert monitor.unselectable == {}


def test_monitor_ignores_no_grad_forwards_and_remove_restores_module():
    net = Net()
    monitor = GWAMonitor(net.head)
    x, y = data()
    logits = net(x)
    with torch.no_grad():
        net(torch.zeros(4, 6))                                 # evaluation forward: not recorded
    monitor.update(logits, y, torch.arange(10))
    assert monitor.last_scores().shape == (10,)
    with pytest.raises(GradAlignError, match="no recorded head input"):
        monitor.update(logits, y, torch.arange(10))           # the input was used up
    net(x)
    with pytest.raises(ValueError, match="batch sizes"):
        monitor.update(logits, y, torch.arange(9))
    monitor.remove()
    assert len(net.head._forward_hooks) == 0
    monitor.remove()


def test_monitor_zero_head_gives_nan_epoch_without_crashing():
    net = Net()
    nn.init.zeros_(net.head.weight)
    monitor = GWAMonitor(net.head)
    x, y = data()
    monitor.update(net(x), y, torch.arange(10))
    assert torch.equal(monitor.last_scores(), torch.zeros(10, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="epoch 0 is not selectable"):
        assert math.isnan(monitor.end_epoch())
    assert "kurtosis undefined" in monitor.unselectable[0]
    assert monitor.epoch_mean_alignment == [0.0]
    with pytest.raises(GradAlignError, match="no selectable epoch"):
        monitor.best_epoch()
    with pytest.raises(GradAlignError, match="no update"):
        monitor.end_epoch()


def test_monitor_marks_non_positive_denominator(monkeypatch):
    net = Net()
    monitor = GWAMonitor(net.head)
    bimodal = torch.tensor([-0.5, 0.5] * 5, dtype=torch.float64)
    monkeypatch.setattr("gradalign.methods.gwa.step_scores", lambda *args: bimodal)
    x, y = data()
    monitor.update(net(x), y, torch.arange(10))
    with pytest.warns(RuntimeWarning, match="denominator"):
        assert math.isnan(monitor.end_epoch())
    assert monitor.epoch_kurtosis == [pytest.approx(-2.0)]
    assert 0 in monitor.unselectable


def monitor_with(scores):
    monitor = GWAMonitor(nn.Linear(2, 2))
    monitor.epoch_scores = [float(s) for s in scores]
    return monitor


@pytest.mark.parametrize("scores,skip,expected", [
    ([9, 1, 2, 5, 3, 4, 0, 1, 2, 3], None, 3),    # 10 epochs: epoch 0 (the first 10%) is skipped
    ([9, 1, 2, 5, 3, 4, 0, 1, 2, 3], 0.0, 0),
    ([9, 1, 2, 5, 3, 4, 0, 1, 2, 3], 0.5, 5),
    ([9, 8, 1], 0.5, 1),                          # floor(1.5) = 1 skipped
    ([9, 8], 0.9, 1),                             # floor(1.8) = 1 but one epoch stays selectable
    ([1, 5, 5, 2], 0.0, 1),                       # tie: the earliest
    ([1, float("nan"), 2, 7, float("nan")], 0.0, 3),
])
def test_best_epoch_scratch(scores, skip, expected):
    assert monitor_with(scores).best_epoch("scratch", skip_fraction=skip) == expected


@pytest.mark.parametrize("scores,expected", [
    ([5, 3, 2, 4, 6, 5, 1, 7], 7),                # first minimum at 2, then the largest after it
    ([5, 3, 2, 4, 6, 5, 1, 0], 4),                # the later dip does not matter
    ([9, 3, 2, 4, 6, 5], 4),                      # larger values before the minimum are ignored
    ([2, 3, 1], 1),                               # rises at once: minimum at 0
    ([5, 4, 3], 2),                               # never rises: the last epoch is the minimum
    ([5, 3, 3, 4], 3),                            # plateau at the minimum
    ([5, float("nan"), 3, 8, 2], 3),              # nan epochs are skipped
])
def test_best_epoch_finetune(scores, expected):
    assert monitor_with(scores).best_epoch("finetune") == expected


def test_best_epoch_finetune_honours_explicit_skip_and_errors():
    assert monitor_with([1, 9, 2, 3, 8, 4]).best_epoch("finetune", skip_fraction=0.34) == 4
    with pytest.raises(ValueError, match="mode"):
        monitor_with([1]).best_epoch("early")
    with pytest.raises(ValueError, match="skip_fraction"):
        monitor_with([1]).best_epoch(skip_fraction=1.0)
    with pytest.raises(GradAlignError, match="before any"):
        monitor_with([]).best_epoch()


@pytest.mark.parametrize("scores,patience,skip,expected", [
    ([1, 2, 3], 2, 0, False),
    ([1, 3, 2, 2], 2, 0, True),                   # best at 1, two epochs without improvement
    ([1, 3, 2, 3], 2, 0, True),                   # equal is not an improvement
    ([1, 3, 2, 4], 2, 0, False),
    ([9, 1, 2, 3], 2, 1, False),                  # epoch 0 skipped: still improving
    ([9, 1, 2, 3], 2, 0, True),
    ([2, float("nan"), float("nan")], 2, 0, True),
    ([float("nan")] * 4, 2, 0, False),            # no best yet
])
def test_should_stop(scores, patience, skip, expected):
    assert monitor_with(scores).should_stop(patience, skip_epochs=skip) is expected


def test_monitor_rejects_non_linear_head():
    with pytest.raises(ValueError, match="nn.Linear"):
        GWAMonitor(nn.Conv1d(1, 1, 1))


def test_monitor_mixes_class_indices_and_soft_labels_across_steps():
    net = Net()
    monitor = GWAMonitor(net.head)
    refs = []
    for step in range(2):
        x, y = data(seed=step)
        targets = y if step == 0 else F.one_hot(y, 3).double() * 0.8 + 0.2 / 3
        logits = net(x)
        monitor.update(logits, targets, torch.arange(10))
        refs.append(gwa_alignment(net.head.weight, net.body(x), logits, targets))
        with torch.no_grad():
            net.head.bias.add_(1.0)                       # bias moves between steps
    monitor.end_epoch()
    np.testing.assert_allclose(monitor.sample_scores()["score"], torch.cat(refs).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="targets must be"):
        net(x)
        monitor.update(net(x), torch.zeros(10, 2), torch.arange(10))


def test_update_refuses_logits_of_another_forward():
    """Scoring logits of one forward with the head input of another gives wrong scores silently."""
    net = Net()
    monitor = GWAMonitor(net.head)
    x, y = data()
    logits = net(x)
    net(data(seed=1)[0])                                      # a second grad-enabled forward, same batch size
    with pytest.raises(GradAlignError, match="not the head's output"):
        monitor.update(logits, y, torch.arange(10))
    logits = net(x)
    with pytest.raises(GradAlignError, match="not the head's output"):
        monitor.update(logits * 2, y, torch.arange(10))       # a transformed output is not W z + b
    logits = net(x)
    monitor.update(logits.detach().clone(), y, torch.arange(10))   # a copy of the same values is fine
    assert monitor.last_scores().shape == (10,)


@pytest.mark.parametrize("ids, match", [(["a"] * 10, "integers"), (torch.arange(10.0), "float"),
                                        (np.arange(10) + 0.5, "integers"), (torch.ones(10, dtype=torch.bool), "bool")])
def test_update_refuses_ids_that_are_not_integers(ids, match):
    net = Net()
    monitor = GWAMonitor(net.head)
    x, y = data()
    logits = net(x)
    with pytest.raises(ValueError, match=match):
        monitor.update(logits, y, ids)


def test_class_out_of_range_is_refused_and_the_monitor_keeps_working(monkeypatch):
    import gradalign.methods.gwa as gwa
    net = Net()
    monitor = GWAMonitor(net.head)
    x, y = data()
    bad = y.clone()
    bad[0] = 3                                                # the head has 3 classes: 0, 1, 2
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        monitor.update(net(x), bad, torch.arange(10))
    monitor.update(net(x), y, torch.arange(10))
    assert math.isfinite(monitor.end_epoch())
    # on an accelerator the check waits for end_epoch (no sync per step); it drops the bad epoch
    real = gwa.check_classes
    monkeypatch.setattr(gwa, "check_classes", lambda targets, C: None)
    monitor.update(net(x), bad, torch.arange(10))
    monkeypatch.setattr(gwa, "check_classes", real)
    with pytest.raises(ValueError, match="update\\(\\) #1 of this epoch"):
        monitor.end_epoch()
    monitor.update(net(x), y, torch.arange(10))
    assert math.isfinite(monitor.end_epoch()) and len(monitor.epoch_scores) == 2



def test_state_dict_mid_epoch_resumes_with_the_same_scores(tmp_path):
    """A checkpoint in the middle of an epoch keeps that epoch's records: a new monitor loaded
    from it closes the epoch with the scores of a monitor that never stopped."""
    def run(stop_after=None):
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        monitor = GWAMonitor(net.head)
        for k in range(4):                                   # 2 epochs of 2 steps
            x, y = data(seed=k)
            logits = net(x)
            F.cross_entropy(logits, y).backward()
            monitor.update(logits, y, torch.arange(10) + 10 * (k % 2))
            opt.step()
            opt.zero_grad()
            if k == stop_after:                              # epoch 1, half done: save, and go on anew
                assert len(monitor.state_dict()["pending"]) == 1
                torch.save(monitor.state_dict(), tmp_path / "gwa.pt")
                monitor.remove()
                monitor = GWAMonitor(net.head)
                monitor.load_state_dict(torch.load(tmp_path / "gwa.pt", weights_only=False))
                assert len(monitor.state_dict()["pending"]) == 1
            if k % 2:
                monitor.end_epoch()
        return monitor
    whole, resumed = run(), run(stop_after=2)
    assert resumed.epoch_scores == whole.epoch_scores and len(whole.epoch_scores) == 2
    for key, value in whole.sample_scores().items():
        np.testing.assert_array_equal(resumed.sample_scores()[key], value)
