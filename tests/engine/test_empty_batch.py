"""Empty batches (B = 0, as Poisson sampling produces): the backward adds nothing to p.grad and
returns empty statistics, on every kind of route."""
import pytest
import torch

import gradalign as ga
from tests.support.engine_models import ARCHITECTURES


@pytest.mark.parametrize("arch", ["seed_mlp", "conv2d_groupnorm", "vit_cls_pos", "lstm_lm", "bag_gru",
                                  "shared_bn_fallback"])
@pytest.mark.parametrize("release", [False, True])
def test_an_empty_batch_adds_nothing_and_gives_empty_statistics(arch, release):
    torch.manual_seed(0)
    model, make_batch, loss_fn = ARCHITECTURES[arch]()
    x, y = make_batch(3, torch.Generator().manual_seed(0))
    before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    engine = ga.PerSampleGradients(model)
    losses = loss_fn(model(x[:0]), y[:0])
    assert losses.shape == (0,)
    stats = engine.backward(losses, weights=ga.GASW(2.0), release=release)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[n], rtol=0, atol=0)
    assert stats.batch_size == 0 and stats.weights.shape == (0,)
    assert stats.norms.shape == stats.cosines.shape == (0,)
    if not release:
        assert stats.dots_with_mean.shape == (0,) and float(stats.mean_grad_sq_norm) == 0.0
        assert stats.grad_sq_sum == {} and stats.mean_grad == {}
    nonempty = engine.backward(loss_fn(model(x), y))  # the next batch is unaffected
    assert nonempty.norms.shape == (3,)


def test_empty_losses_need_no_gradient():
    model = torch.nn.Linear(3, 2)
    stats = ga.PerSampleGradients(model).backward(torch.zeros(0))
    assert stats.norms.shape == (0,) and model.weight.grad is None
