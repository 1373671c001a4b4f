"""ga.validate with example inputs: each module's route, every problem with its fix, and the model
left as it was; without inputs, the static list as before."""
import torch
import torch.nn.functional as F
from torch import nn

import gradalign as ga
from tests.support.recurrent_models import SequenceFirstLM


class EveryRoute(nn.Module):
    """A Linear (rule), a raw scale (watched), a PReLU-style module (the torch.func fallback), position
    embeddings looked up with (1, T) ids (a rule on a value shared by all samples), an LSTM (rule),
    and a Linear whose output the losses never read (not used)."""

    class Slope(nn.Module):
        def __init__(self):
            super().__init__()
            self.slope = nn.Parameter(torch.rand(5))

        def forward(self, x):
            return F.prelu(x.transpose(1, 2), self.slope).transpose(1, 2)

    def __init__(self):
        super().__init__()
        self.inp, self.act, self.pos = nn.Linear(3, 5), self.Slope(), nn.Embedding(4, 5)
        self.scale = nn.Parameter(torch.ones(5))
        self.rnn, self.head, self.unused = nn.LSTM(5, 5, batch_first=True), nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x, *, shift=0.0):  # (B, T, 3)
        h = self.act(self.inp(x)) * self.scale + self.pos(torch.arange(x.shape[1]).unsqueeze(0))
        self.unused(h)
        return self.head(self.rnn(h + shift)[0].mean(1))


def test_routes_of_every_kind_and_no_problem():
    torch.manual_seed(0)
    model = EveryRoute()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    report = ga.validate(model, torch.randn(6, 4, 3), shift=0.5)
    assert report == [], str(report)
    assert report.routes == {"": "watched", "act": "fallback", "head": "rule", "inp": "rule", "pos": "shared",
                             "rnn": "rule", "unused": "not used"}
    assert "fallback" in str(report) and "no problems" in str(report)
    for n, p in model.named_parameters():  # the model's gradients are as they were
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    engine = ga.PerSampleGradients(model)
    out = model(torch.randn(6, 4, 3))
    engine.backward(F.cross_entropy(out, torch.zeros(6, dtype=torch.long), reduction="none"))
    assert engine.routes() == {k: v for k, v in report.routes.items() if v != "not used"}


def test_t_equal_to_b_undeclared_is_reported_with_the_declaration():
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (5, 5))  # (T, B) with T == B
    report = ga.validate(SequenceFirstLM(), ids)
    assert any("on both dims 0 and 1" in p and "batch_first=False" in p for p in report), report
    assert ga.validate(SequenceFirstLM(), ids, batch_first=False) == []
    assert ga.validate(SequenceFirstLM(), torch.randint(0, 11, (5, 3)), batch_first=False) == []


def test_a_refused_module_is_listed_and_the_rest_is_still_run():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    report = ga.validate(model, torch.randn(5, 3))
    assert len(report) == 1 and "BatchNorm" in report[0] and "replace_batchnorm" in report[0]
    assert report.routes == {"0": "rule", "1": "refused", "2": "rule"}
    assert all(p.requires_grad for p in model.parameters())
    static = ga.validate(model)
    assert static == report and static.routes == {"0": "rule", "1": "refused", "2": "rule"}


def test_a_problem_of_the_call_is_reported_with_its_fix():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(self.a(x), self.b.weight)

    report = ga.validate(Sneaky(), torch.randn(4, 3))
    assert len(report) == 1 and "b.weight" in report[0] and "call the module instead" in report[0]
