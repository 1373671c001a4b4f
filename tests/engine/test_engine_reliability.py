"""The engine's reliability: bounded records, clear errors, precision of weights, sample mixing
caught by verify."""
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga


def losses_of(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def test_records_of_forwards_no_engine_backward_uses_are_freed():
    """Plain loss.backward() steps and evaluations with gradients on used to keep every input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    engine = ga.PerSampleGradients(model, max_pending_forwards=3)
    alive = []
    with pytest.warns(RuntimeWarning, match="records of the older ones were dropped") as caught:
        for _ in range(40):
            x = torch.randn(16, 64)
            alive.append(weakref.ref(x))
            losses_of(model, x, torch.randint(0, 4, (16,))).mean().backward()   # a plain step
    assert len(caught) == 1                                                    # warned once
    del x
    gc.collect()
    assert sum(r() is not None for r in alive) <= 3                            # inputs of the last 3 forwards
    x, y = torch.randn(16, 64), torch.randint(0, 4, (16,))
    stats = engine.backward(losses_of(model, x, y))                            # the engine still works
    ref = ga.reference_statistics(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    torch.testing.assert_close(stats.norms, ref["norms"], rtol=1e-4, atol=1e-6)


def test_paused_and_clear_record_nothing_and_warn_nothing():
    model = nn.Sequential(nn.Linear(8, 3))
    engine = ga.PerSampleGradients(model, max_pending_forwards=2)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with engine.paused():
            for _ in range(10):
                losses_of(model, x, y).mean().backward()                       # e.g. an evaluation with grad
        for _ in range(10):
            losses_of(model, x, y)
            engine.clear()
    assert not any(h.calls for h in engine._hooked.values())
    stats = engine.backward(losses_of(model, x, y))
    assert stats.norms.shape == (5,)


def test_two_forwards_summed_into_one_backward_still_work():
    """The cap keeps the last few forwards, so a backward of two views' summed losses is exact."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x1, x2, y = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 3, (4,))
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(losses_of(model, x1, y) + losses_of(model, x2, y))
    per_view = [ga.reference_gradients(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
                for x in (x1, x2)]
    flat = torch.cat([(per_view[0][n] + per_view[1][n]).flatten(1) for n in per_view[0]], 1)
    torch.testing.assert_close(stats.norms, flat.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_backward_after_remove_says_so():
    model = nn.Sequential(nn.Linear(4, 3))
    engine = ga.PerSampleGradients(model)
    engine.remove()
    with pytest.raises(ga.GradAlignError, match=r"engine was removed \(engine.remove\(\)\)"):
        engine.backward(losses_of(model, torch.randn(5, 4), torch.randint(0, 3, (5,))))


def test_losses_and_weights_of_another_dtype_than_the_model():
    """float64 losses and weights on a float32 model used to fail inside weighted_sum,
    after the graph was consumed."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    w = torch.rand(5, dtype=torch.float64)
    engine = ga.PerSampleGradients(model)
    stats = engine.backward(losses_of(model, x, y).double(), weights=w)
    ref = ga.reference_statistics(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                  weights=w.float())
    assert model[0].weight.grad.dtype == torch.float32 and stats.weights.dtype == torch.float32
    torch.testing.assert_close(model[0].weight.grad, ref["weighted_grad"]["0.weight"], rtol=1e-5, atol=1e-6)


class SequenceFirstInside(nn.Module):
    """Feeds its Linear a (T, B, D) tensor: against the batch contract."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, 4)
        h = self.lin(x.transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


def test_verify_catches_a_layer_fed_time_first_when_T_equals_B():
    torch.manual_seed(3)
    model = SequenceFirstInside()
    x, y = torch.randn(5, 5, 4), torch.randint(0, 3, (5,))         # T == B: shapes cannot tell
    with pytest.raises(ga.UnsupportedModuleError, match="mixes (the )?samples"):
        ga.PerSampleGradients(model, verify=True).backward(losses_of(model, x, y))
    x = torch.randn(5, 6, 4)                                        # T != B: caught without verify (lin's output looks shared)
    with pytest.raises(ga.UnsupportedModuleError, match="shared by all samples.*batch-first"):
        ga.PerSampleGradients(model).backward(losses_of(model, x, y))


def test_max_pending_forwards_is_checked():
    with pytest.raises(ValueError, match="max_pending_forwards"):
        ga.PerSampleGradients(nn.Linear(2, 2), max_pending_forwards=0)
