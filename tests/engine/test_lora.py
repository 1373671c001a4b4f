"""LoRA-style adapters (a frozen base Linear plus trainable low-rank Linears) against torch.func."""
import pytest
import torch
from torch import nn

import gradalign as ga
from tests.support.layer_models import LAYER_ARCHITECTURES, LoRALinear
from tests.support.compare import compare_all, run_engine


@pytest.mark.parametrize("B", [1, 7, 64])
def test_lora_matches_torch_func(B):
    torch.manual_seed(0)
    model, make_batch, loss_fn = LAYER_ARCHITECTURES["lora"]()
    stats = compare_all(model, make_batch, loss_fn, B)
    # the adapters (and the LayerNorm) are trained: the frozen bases have no statistics and no gradient
    assert sorted(n for n in stats.grad_sq_sum if "norm" not in n) == [
        "head.A.weight", "head.B.weight", "mix.A.weight", "mix.B.weight"]
    assert model.mix.base.weight.grad is None and model.head.base.bias.grad is None


def test_lora_adapters_are_served_by_the_linear_rule_not_the_fallback():
    from gradalign.engine.rules.linear import linear_rule
    from gradalign.engine.validate import survey
    adapter = LoRALinear(4, 3)
    served, problems = survey(adapter, ga.default_registry())
    assert problems == [] and {s.path: s.rule.compute for s in served} == {"A": linear_rule, "B": linear_rule}


def test_lora_with_zero_initialised_b():
    # LoRA's own initialisation: B = 0, so A's per-sample gradients are exactly zero at first
    torch.manual_seed(1)
    model = nn.Sequential(LoRALinear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.init.zeros_(model[0].B.weight)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    stats, grads = run_engine(model, x, y, loss_fn)
    assert torch.count_nonzero(stats.grad_sq_sum["0.A.weight"]) == 0 and torch.count_nonzero(grads["0.A.weight"]) == 0
    ref = ga.reference_statistics(model, x, y, loss_fn)
    torch.testing.assert_close(stats.norms, ref["norms"])
    torch.testing.assert_close(grads["0.B.weight"], ref["mean_grad"]["0.B.weight"])
